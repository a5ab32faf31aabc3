"""The exporter-toolkit web configuration file on the exporter's and the receiver's HTTP servers.

Real servers over real sockets: basic auth (bcrypt) and TLS with and without client certificates on
/metrics, health left open for the kubelet, the webhook keeping its bearer token, and a wrong file
ending start-up with exit 2 and one line.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml

from devstack.embedded import EmbeddedPulsar, free_port
from exporter.config import AllInOneSettings, ConfigError, ExporterSettings, ReceiverSettings
from exporter.receiver import webhook as receiver
from exporter.service.app import ExporterService
from exporter.simulator.server import SimulatorServer
from exporter.web import webconfig
from tests.support.certs import Pki, make_pki
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, unique_topic

USER, PASSWORD = "prometheus", "s3cret-scrape"
# Cost 4 keeps the suite fast; the cache is measured at the production cost in bench/bench_scrape.py.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def write_config(directory: Path, content: dict[str, Any]) -> str:
    path = directory / "web-config.yml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return str(path)


def client_context(pki: Pki, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if with_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    server = SimulatorServer(category="A", seed=1)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def start_exporter(sim: SimulatorServer, web_config_file: str, **overrides: Any) -> ExporterService:
    values: dict[str, Any] = {
        "bridge_address": sim.address,
        "listen_host": "127.0.0.1",
        "metrics_port": free_port(),
        "health_check_port": free_port(),
        "poll_interval_seconds": 1.0,
        "poll_lead_seconds": 0.25,
        "poll_budget_override": True,
        "web_config_file": web_config_file,
    }
    values.update(overrides)
    service = ExporterService(ExporterSettings(**values))
    await service.start()
    return service


async def status(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with http.get(url, **kwargs) as response:
        await response.read()
        return response.status


# --- basic auth


async def test_metrics_need_the_basic_auth_password_and_health_stays_open(
    tmp_path: Path, sim: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    path = write_config(
        tmp_path,
        {
            "basic_auth_users": {USER: HASH},
            "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        },
    )
    service = await start_exporter(sim, path)
    try:
        base = f"http://127.0.0.1:{service.ports['metrics']}"
        async with http.get(base + "/metrics") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Basic")
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert await status(http, base + "/metrics", headers=basic(USER, "wrong")) == 401
        assert await status(http, base + "/metrics", headers=basic("intruder", PASSWORD)) == 401
        assert await status(http, base + "/api/v1/policies") == 401
        async with http.get(base + "/metrics", headers=basic(USER, PASSWORD)) as response:
            assert response.status == 200
            assert "dict_rate_limit" in await response.text()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        # The kubelet sends no credentials: the health port answers without them.
        assert await status(http, f"http://127.0.0.1:{service.ports['health']}/health/live") == 200
    finally:
        await service.stop()


async def test_on_a_shared_port_health_paths_are_exempt_but_metrics_are_not(
    tmp_path: Path, sim: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    path = write_config(tmp_path, {"basic_auth_users": {USER: HASH}})
    port = free_port()
    service = await start_exporter(sim, path, metrics_port=port, health_check_port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert await status(http, base + "/health/live") == 200
        assert await status(http, base + "/metrics") == 401
    finally:
        await service.stop()


async def test_a_successful_bcrypt_check_is_cached_and_a_wrong_password_is_not_accepted() -> None:
    auth = webconfig.BasicAuth({USER: HASH.encode()})
    header = basic(USER, PASSWORD)["Authorization"]
    assert all([await auth.check(header) for _ in range(5)])
    assert auth.bcrypt_checks == 1
    assert not await auth.check(basic(USER, "wrong")["Authorization"])
    assert not await auth.check(basic("nobody", PASSWORD)["Authorization"])
    assert not await auth.check("Bearer " + PASSWORD)
    assert auth.bcrypt_checks == 3  # each new credential pays bcrypt once; the bearer one is refused early


# --- TLS


async def test_tls_serves_metrics_and_the_health_port_stays_plain(
    tmp_path: Path, pki: Pki, sim: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    tls = {"cert_file": "server.pem", "key_file": "server.key"}
    path = write_config(tmp_path, {"tls_server_config": tls})
    service = await start_exporter(sim, path)
    try:
        port = service.ports["metrics"]
        context = client_context(pki, with_cert=False)
        assert await status(http, f"https://127.0.0.1:{port}/metrics", ssl=context) == 200
        with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port is no scrape
            await status(http, f"http://127.0.0.1:{port}/metrics")
        assert await status(http, f"http://127.0.0.1:{service.ports['health']}/health/ready") in {200, 503}
    finally:
        await service.stop()


async def test_client_certificates_are_required_when_the_file_says_so(
    tmp_path: Path, pki: Pki, sim: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    path = write_config(
        tmp_path,
        {
            "tls_server_config": {
                "cert_file": pki.server_cert,
                "key_file": pki.server_key,
                "client_ca_file": "ca.pem",
                "client_auth_type": "RequireAndVerifyClientCert",
                "min_version": "TLS12",
                "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
            },
            "basic_auth_users": {USER: HASH},
        },
    )
    service = await start_exporter(sim, path)
    try:
        url = f"https://127.0.0.1:{service.ports['metrics']}/metrics"
        with_cert = client_context(pki, with_cert=True)
        assert await status(http, url, ssl=with_cert, headers=basic(USER, PASSWORD)) == 200
        assert await status(http, url, ssl=with_cert) == 401  # the certificate does not replace the password
        with pytest.raises(aiohttp.ClientError):
            await status(http, url, ssl=client_context(pki, with_cert=False), headers=basic(USER, PASSWORD))
        # Over TLS 1.2 the server negotiates only the cipher the file names.
        port = service.ports["metrics"]
        tls12 = client_context(pki, with_cert=True)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls12)
        assert writer.get_extra_info("cipher")[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        writer.close()
        tls12.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # refused in the handshake
            await asyncio.open_connection("127.0.0.1", port, ssl=tls12)
    finally:
        await service.stop()


async def test_an_optional_client_certificate_lets_both_kinds_of_client_in(
    tmp_path: Path, pki: Pki, sim: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    path = write_config(
        tmp_path,
        {
            "tls_server_config": {
                "cert_file": "server.pem",
                "key_file": "server.key",
                "client_ca_file": "ca.pem",
                "client_auth_type": "VerifyClientCertIfGiven",
            }
        },
    )
    service = await start_exporter(sim, path)
    try:
        url = f"https://127.0.0.1:{service.ports['metrics']}/metrics"
        assert await status(http, url, ssl=client_context(pki, with_cert=True)) == 200
        assert await status(http, url, ssl=client_context(pki, with_cert=False)) == 200
    finally:
        await service.stop()


# --- wrong files: one line, exit 2


def _bad_files(pki: Pki) -> list[tuple[dict[str, Any] | str, str]]:
    tls = {"cert_file": pki.server_cert, "key_file": pki.server_key}
    return [
        ("tls_server_config: [unclosed", "not valid YAML"),
        ({"basic_auth_user": {USER: HASH}}, "unknown field basic_auth_user"),
        ({"basic_auth_users": {USER: "plain-text-password"}}, "not a bcrypt hash"),
        ({"tls_server_config": {**tls, "cert_file": "missing.pem"}}, "cert_file: cannot read"),
        ({"tls_server_config": {**tls, "cert_file": pki.ca}}, "cannot load cert_file/key_file"),
        ({"tls_server_config": {**tls, "client_auth_type": "RequireAnyClientCert"}}, "is not supported"),
        ({"tls_server_config": {**tls, "client_auth_type": "Sometimes"}}, "invalid value 'Sometimes'"),
        ({"tls_server_config": {**tls, "client_auth_type": "RequireAndVerifyClientCert"}}, "needs client_ca"),
        ({"tls_server_config": {**tls, "client_ca_file": pki.ca}}, "without a client_auth_type"),
        ({"tls_server_config": {**tls, "min_version": "SSL3"}}, "unknown TLS version 'SSL3'"),
        ({"tls_server_config": {**tls, "cipher_suites": ["TLS_RSA_WITH_RC4_128_SHA"]}}, "insecure cipher"),
        ({"tls_server_config": {**tls, "curve_preferences": ["X25519"]}}, "curve_preferences"),
        ({"tls_server_config": {**tls, "cert": "PEM"}}, "use cert_file"),
        ({"http_server_config": {"headers": {"Server": "x"}}}, "header 'Server' cannot be configured"),
        ({"rate_limit": {"interval": "1s", "burst": 5}}, "rate_limit is not supported"),
    ]


def test_every_wrong_file_is_refused_naming_the_problem(tmp_path: Path, pki: Pki) -> None:
    for content, message in _bad_files(pki):
        path = tmp_path / "web.yml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            webconfig.load(str(path))
        assert caught.value.key == "WEB_CONFIG_FILE"
        assert message in caught.value.reason, (content, caught.value.reason)


@pytest.mark.parametrize("command", ["exporter", "receiver", "all-in-one"])
def test_a_wrong_web_config_ends_start_up_with_exit_2_and_one_line(
    tmp_path: Path, pki: Pki, command: str
) -> None:
    path = write_config(tmp_path, {"basic_auth_users": {USER: "$2y$10$tooshort"}})
    result = subprocess.run(
        [sys.executable, "-m", "exporter.cli", command, "--web.config.file", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "WEB_CONFIG_FILE" in lines[0]
    assert "basic_auth_users.prometheus: not a bcrypt hash" in lines[0]


def test_a_missing_file_and_an_impossible_port_layout_are_refused(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        webconfig.load(str(tmp_path / "absent.yml"))
    path = write_config(
        tmp_path,
        {
            "tls_server_config": {
                "cert_file": "server.pem",
                "key_file": "server.key",
                "client_ca_file": "ca.pem",
                "client_auth_type": "RequireAndVerifyClientCert",
            }
        },
    )
    with pytest.raises(ConfigError, match="HEALTH_CHECK_PORT distinct"):
        webconfig.check_ports(webconfig.load(path), 9100, 9100)
    with pytest.raises(ConfigError, match="RECEIVER_PORT"):
        webconfig.check_ports(webconfig.load(path), 9100, 8080, receiver_port=9100)
    webconfig.check_ports(webconfig.load(path), 9100, 8080, receiver_port=9097)


# --- the receiver


async def test_the_receiver_guards_metrics_and_the_webhook_keeps_its_token(
    tmp_path: Path,
    pki: Pki,
    database_url: str,
    pulsar_broker: EmbeddedPulsar,
    http: aiohttp.ClientSession,
) -> None:
    migrate(database_url)
    path = write_config(
        tmp_path,
        {
            "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key"},
            "basic_auth_users": {USER: HASH},
        },
    )
    webhook, metrics, health = free_port(), free_port(), free_port()
    settings = ReceiverSettings(
        listen_host="127.0.0.1",
        database_url=database_url,
        webhook_bearer_token=TOKEN,
        receiver_port=webhook,
        metrics_port=metrics,
        health_check_port=health,
        pulsar_url=pulsar_broker.url,
        pulsar_topic=unique_topic(),
        web_config_file=path,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(receiver.serve(settings, stop))
    try:
        tls = client_context(pki, with_cert=False)
        url = f"https://127.0.0.1:{metrics}/metrics"
        for _ in range(100):
            try:
                assert await status(http, url, ssl=tls) == 401
                break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.1)
        assert await status(http, url, ssl=tls, headers=basic(USER, PASSWORD)) == 200
        assert await status(http, f"http://127.0.0.1:{health}/health/live") == 200
        assert await status(http, f"http://127.0.0.1:{health}/metrics") == 404  # nothing leaks in plain
        alerts_url = f"http://127.0.0.1:{webhook}/alerts"
        body = payload(alert())
        async with http.post(alerts_url, json=body, headers=basic(USER, PASSWORD)) as response:
            assert response.status == 401  # basic auth is not the webhook's credential
        async with http.post(alerts_url, json=body, headers=AUTH) as response:
            assert response.status == 200, await response.text()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_all_in_one_guards_its_metrics_port_and_leaves_health_and_webhook_alone(
    tmp_path: Path, pki: Pki, database_url: str, http: aiohttp.ClientSession
) -> None:
    from exporter.allinone import serve

    migrate(database_url)
    tls = {"cert_file": "server.pem", "key_file": "server.key"}
    path = write_config(tmp_path, {"tls_server_config": tls, "basic_auth_users": {USER: HASH}})
    metrics, health, webhook = free_port(), free_port(), free_port()
    settings = AllInOneSettings(
        database_url=database_url,
        webhook_bearer_token=TOKEN,
        listen_host="127.0.0.1",
        receiver_port=webhook,
        metrics_port=metrics,
        health_check_port=health,
        bridge_address=f"127.0.0.1:{free_port()}",  # no Bridge: the exporter part reports it
        bridge_timeout_seconds=0.2,
        pulsar_url=f"pulsar://127.0.0.1:{free_port()}",
        web_config_file=path,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        for _ in range(100):
            try:
                assert await status(http, f"http://127.0.0.1:{health}/health/live") == 200
                break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.1)
        url = f"https://127.0.0.1:{metrics}/metrics"
        context = client_context(pki, with_cert=False)
        assert await status(http, url, ssl=context) == 401
        assert await status(http, url, ssl=context, headers=basic(USER, PASSWORD)) == 200
        async with http.post(f"http://127.0.0.1:{webhook}/alerts", json=payload(alert()), headers=AUTH) as r:
            assert r.status == 200
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) is None


@pytest.mark.parametrize(("allowed", "expected"), [("scraper.test", 200), ("other.test", 403)])
async def test_client_allowed_sans_admit_only_the_listed_certificates(
    tmp_path: Path, sim: SimulatorServer, http: aiohttp.ClientSession, allowed: str, expected: int
) -> None:
    pki = make_pki(tmp_path, client_san="scraper.test")
    path = write_config(
        tmp_path,
        {
            "tls_server_config": {
                "cert_file": "server.pem",
                "key_file": "server.key",
                "client_ca_file": "ca.pem",
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_allowed_sans": [allowed],
            }
        },
    )
    service = await start_exporter(sim, path)
    try:
        url = f"https://127.0.0.1:{service.ports['metrics']}/metrics"
        assert await status(http, url, ssl=client_context(pki, with_cert=True)) == expected
    finally:
        await service.stop()


# --- changes of the file while serving (the toolkit re-reads it; cert-manager rotates in place)


async def handshake_ok(port: int, ca: str) -> bool:
    """A new TLS connection (no SNI: an IP address, as Prometheus scraping a pod) trusting only ``ca``."""
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl.create_default_context(cafile=ca)
        )
    except (ssl.SSLError, ConnectionResetError):
        return False
    writer.close()
    return True


def install(source: Pki, directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    for name in ("server.pem", "server.key"):
        shutil.copy(Path(source.server_cert).parent / name, directory / name)


async def test_a_rotated_certificate_serves_the_next_handshake_without_a_restart(
    tmp_path: Path, sim: SimulatorServer
) -> None:
    old, new = make_pki(_made(tmp_path / "old")), make_pki(_made(tmp_path / "new"))
    install(old, tmp_path / "live")
    path = write_config(
        tmp_path, {"tls_server_config": {"cert_file": "live/server.pem", "key_file": "live/server.key"}}
    )
    service = await start_exporter(sim, path)
    try:
        port = service.ports["metrics"]
        assert await handshake_ok(port, old.ca)
        assert not await handshake_ok(port, new.ca)
        install(new, tmp_path / "live")
        await asyncio.sleep(webconfig.RELOAD_CHECK_SECONDS + 0.2)
        assert await handshake_ok(port, new.ca)
        assert not await handshake_ok(port, old.ca)
    finally:
        await service.stop()


async def test_changed_users_apply_to_the_next_request_and_a_broken_rewrite_keeps_them(
    tmp_path: Path, sim: SimulatorServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, {"basic_auth_users": {USER: HASH}})
    service = await start_exporter(sim, path)
    try:
        url = f"http://127.0.0.1:{service.ports['metrics']}/metrics"
        assert await status(http, url, headers=basic(USER, PASSWORD)) == 200
        rotated = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
        write_config(tmp_path, {"basic_auth_users": {USER: rotated}})
        await asyncio.sleep(webconfig.RELOAD_CHECK_SECONDS + 0.2)
        assert await status(http, url, headers=basic(USER, PASSWORD)) == 401
        assert await status(http, url, headers=basic(USER, "rotated")) == 200
        # Half-written: the previous users stay in force (neither open nor locked out), and it is logged.
        await asyncio.to_thread(Path(path).write_text, "basic_auth_users: {prometheus: [", "utf-8")
        await asyncio.sleep(webconfig.RELOAD_CHECK_SECONDS + 0.2)
        assert await status(http, url, headers=basic(USER, "rotated")) == 200
        assert await status(http, url) == 401
        assert "WEB_CONFIG_FILE" in caplog.text
        assert "previous web configuration stays" in caplog.text
    finally:
        await service.stop()


def test_what_a_running_listener_cannot_change_is_refused_until_a_restart(tmp_path: Path, pki: Pki) -> None:
    tls = {"cert_file": "server.pem", "key_file": "server.key"}
    path = write_config(tmp_path, {"tls_server_config": tls})
    config = webconfig.load(path)
    live = webconfig.LiveWebConfig(config, check_seconds=0)
    changes = [
        {"tls_server_config": {**tls, "min_version": "TLS13"}},
        {
            "tls_server_config": {
                **tls,
                "client_ca_file": "ca.pem",
                "client_auth_type": "VerifyClientCertIfGiven",
            }
        },
        {"basic_auth_users": {USER: HASH}},  # TLS removed
    ]
    for number, content in enumerate(changes, start=1):
        write_config(tmp_path, content)
        os.utime(path, ns=(number * 10**9, number * 10**9))  # a new stamp even within the clock's tick
        assert live.current().tls is config.tls, content
        assert live.failures == number
    assert live.reloads == 0
    write_config(tmp_path, {"tls_server_config": tls, "basic_auth_users": {USER: HASH}})
    os.utime(path, ns=(9 * 10**9, 9 * 10**9))
    assert live.current().users == {USER: HASH.encode()}  # what it can change, it applies
    assert live.reloads == 1


def _made(directory: Path) -> Path:
    directory.mkdir()
    return directory
