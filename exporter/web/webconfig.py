"""The Prometheus exporter-toolkit web configuration file (``--web.config.file``) for our aiohttp servers.

Same YAML format as every exporter of the ecosystem (prometheus/exporter-toolkit,
docs/web-configuration.md): ``tls_server_config``, ``http_server_config`` and ``basic_auth_users``
(bcrypt hashes). What Python's ``ssl`` cannot honour is refused with one line naming the field, never
ignored silently: a security setting that is not applied must not look applied.

Relative file names are read relative to the file's directory, as the toolkit does. Like the toolkit,
which reads the file per request, a change is applied without a restart (cert-manager rotates certificates
in place): the file and the certificate, key and CA files it names are checked at most once a second,
re-read when one changed, and the new settings serve the next request and the next TLS handshake. A file
that no longer loads keeps the previous settings (logged): a half-written rotation must not open the port
or take it down. What a running TLS listener cannot change (TLS on or off, client_auth_type, versions,
ciphers) is refused the same way, naming the field: restart to apply it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from aiohttp import web

from exporter.config import ConfigError

#: The key every error names (the lead's flag ``--web.config.file`` sets it too).
KEY = "WEB_CONFIG_FILE"

TOP_LEVEL = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
TLS_FIELDS = {
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_ca",
    "client_auth_type",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
}
#: Toolkit fields Python's ssl (or this server) cannot honour, with the reason shown to the user.
TLS_UNSUPPORTED = {
    "cert": "inline certificates are not supported: use cert_file",
    "key": "inline keys are not supported: use key_file",
    "curve_preferences": "Python's ssl cannot set an ECDHE curve preference list",
}
CLIENT_AUTH = {
    "": ssl.CERT_NONE,
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
#: Go modes that ask for a certificate without verifying it: OpenSSL through Python cannot do that.
CLIENT_AUTH_UNSUPPORTED = {"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: Go's names (crypto/tls CipherSuites(): the secure ones) -> OpenSSL's. TLS 1.3 suites are not
#: configurable in Go either; they are accepted and change nothing, as there.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
#: The headers the toolkit lets a file set, with their allowed values (None: any).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
BCRYPT_HASH = re.compile(r"^\$2[aby]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
#: Compared against when the user is unknown, so timing does not tell which users exist (as the toolkit).
FAKE_HASH = b"$2b$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
#: Paths never behind basic auth or client-SAN checks: the kubelet's probes carry no credentials.
HEALTH_PREFIX = "/health/"
#: Seconds between two looks at the files' stamps (a stat each; the toolkit re-reads on every request).
RELOAD_CHECK_SECONDS = 1.0

log = logging.getLogger(__name__)


def _fail(reason: str) -> ConfigError:
    return ConfigError(KEY, reason)


@dataclass(frozen=True)
class WebConfig:
    """A parsed web configuration; ``WebConfig()`` is the open server (no file given)."""

    path: str | None = None
    tls: ssl.SSLContext | None = None
    client_auth: str = "NoClientCert"
    client_allowed_sans: frozenset[str] = frozenset()
    users: Mapping[str, bytes] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The TLS settings a running listener keeps (versions, ciphers): a reload may not change them.
    tls_fixed: tuple[tuple[str, str], ...] = ()
    #: The files the settings came from (the YAML first): a reload is due when one of them changes.
    files: tuple[str, ...] = ()
    #: Applies later changes of the files (None for the open server).
    live: LiveWebConfig | None = field(default=None, compare=False, repr=False)

    @property
    def requires_client_cert(self) -> bool:
        return self.client_auth == "RequireAndVerifyClientCert"

    @property
    def enabled(self) -> bool:
        # A file, even one that sets nothing yet, is followed: users or headers added later apply.
        return bool(self.path or self.tls or self.users or self.headers)


def load(path: str | None) -> WebConfig:
    """Reads and checks the file; any problem raises ConfigError(WEB_CONFIG_FILE, one line).

    The result follows later changes of the files (:class:`LiveWebConfig`): its TLS context switches each
    new handshake to the newest certificates, and :func:`middleware` reads the newest users and headers.
    """
    if not path:
        return WebConfig()
    config = _read(path)
    live = LiveWebConfig(config)
    if config.tls is not None:
        config.tls.sni_callback = live.switch_context
    return replace(config, live=live)


def _read(path: str) -> WebConfig:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(f"cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise _fail(f"{path!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise _fail(f"{path!r} must hold a mapping")
    _only(loaded, TOP_LEVEL, "")
    if loaded.get("rate_limit"):
        raise _fail("rate_limit is not supported by this exporter")
    directory = Path(path).parent
    tls_section = _section(loaded, "tls_server_config")
    tls, client_auth, sans = _tls(tls_section, directory) if tls_section else (None, "NoClientCert", [])
    return WebConfig(
        path=path,
        tls=tls,
        client_auth=client_auth,
        client_allowed_sans=frozenset(sans),
        users=_users(loaded.get("basic_auth_users")),
        headers=_headers(_section(loaded, "http_server_config")),
        tls_fixed=_tls_fixed(tls_section),
        files=(path, *_named_files(tls_section, directory)),
    )


def _tls_fixed(section: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    if not section:
        return ()
    return tuple(
        (name, repr(section.get(name)))
        for name in ("min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites")
    )


def _named_files(section: Mapping[str, Any], directory: Path) -> list[str]:
    names = (section.get(name) for name in ("cert_file", "key_file", "client_ca_file"))
    return [str(directory / name) for name in names if isinstance(name, str) and name]


def _stamps(files: Iterable[str]) -> tuple[object, ...]:
    """What changes when a file is rewritten or replaced (a Kubernetes Secret swaps a symlink)."""
    stamps: list[object] = []
    for name in files:
        try:
            stat = os.stat(name)
        except OSError as exc:
            stamps.append(exc.errno)
        else:
            stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


class LiveWebConfig:
    """The newest settings of a web configuration file, re-read when one of its files changes.

    Checked lazily, from requests and handshakes (at most once per ``check_seconds``): no thread, no
    timer. A change that does not load, or that a running listener cannot apply, keeps the previous
    settings and is logged once.
    """

    def __init__(self, config: WebConfig, *, check_seconds: float = RELOAD_CHECK_SECONDS) -> None:
        self._config = config
        self._check_seconds = check_seconds
        self._checked = time.monotonic()
        self._stamps = _stamps(config.files)
        self.reloads = 0
        self.failures = 0

    def current(self) -> WebConfig:
        now = time.monotonic()
        if now - self._checked >= self._check_seconds:
            self._checked = now
            self._reload_if_changed()
        return self._config

    def switch_context(
        self, ssl_object: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext
    ) -> None:
        """The listener's ``sni_callback`` (called with or without SNI): hand over the newest certificates."""
        newest = self.current().tls
        if newest is not None and newest is not context:
            ssl_object.context = newest

    def _reload_if_changed(self) -> None:
        stamps = _stamps(self._config.files)
        if stamps == self._stamps:
            return
        self._stamps = stamps
        assert self._config.path is not None  # a LiveWebConfig is made only for a file
        try:
            config = _read(self._config.path)
            _refuse_fixed_changes(self._config, config)
        except ConfigError as exc:
            self.failures += 1
            log.error("%s: %s; the previous web configuration stays in force", exc.key, exc.reason)
            return
        self._config = config
        self._stamps = _stamps(config.files)  # the new file may name other certificate files
        self.reloads += 1
        log.info("web configuration reloaded from %s", config.path)


def _refuse_fixed_changes(old: WebConfig, new: WebConfig) -> None:
    # A handshake can switch certificates and CAs, not the mode, versions or ciphers it was set up with.
    if (old.tls is None) != (new.tls is None):
        raise _fail("tls_server_config added or removed: restart to apply")
    if old.client_auth != new.client_auth:
        raise _fail("tls_server_config.client_auth_type changed: restart to apply")
    for (name, before), (_same, after) in zip(old.tls_fixed, new.tls_fixed, strict=True):
        if before != after:
            raise _fail(f"tls_server_config.{name} changed: restart to apply")


def _section(loaded: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = loaded.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{name} must be a mapping")
    return value


def _only(section: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
    for name in section:
        if name not in allowed:
            raise _fail(f"unknown field {prefix}{name}")


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(f"tls_server_config.{name} must be a list of strings")
    return value


def _file(directory: Path, value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"tls_server_config.{name} must be a file name")
    path = directory / value
    if not path.is_file():
        raise _fail(f"tls_server_config.{name}: cannot read {str(path)!r}")
    return str(path)


def _tls(section: dict[str, Any], directory: Path) -> tuple[ssl.SSLContext, str, list[str]]:
    for name, reason in TLS_UNSUPPORTED.items():
        if section.get(name):
            raise _fail(f"tls_server_config.{name}: {reason}")
    _only(section, TLS_FIELDS | set(TLS_UNSUPPORTED), "tls_server_config.")
    if not section.get("cert_file") or not section.get("key_file"):
        raise _fail("tls_server_config needs cert_file and key_file")
    cert = _file(directory, section["cert_file"], "cert_file")
    key = _file(directory, section["key_file"], "key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise _fail(f"tls_server_config: cannot load cert_file/key_file: {exc}") from None
    _versions(context, section)
    _ciphers(context, section)
    client_auth = str(section.get("client_auth_type") or "NoClientCert")
    _client_auth(context, section, client_auth, directory)
    return context, client_auth, _str_list(section.get("client_allowed_sans"), "client_allowed_sans")


def _versions(context: ssl.SSLContext, section: Mapping[str, Any]) -> None:
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = section.get(name) or default
        if value not in TLS_VERSIONS:
            raise _fail(f"tls_server_config.{name}: unknown TLS version {value!r}")
        try:
            setattr(context, name, TLS_VERSIONS[value])
        except (ValueError, ssl.SSLError) as exc:
            raise _fail(f"tls_server_config.{name}: {exc}") from None


def _ciphers(context: ssl.SSLContext, section: Mapping[str, Any]) -> None:
    names = _str_list(section.get("cipher_suites"), "cipher_suites")
    openssl = []
    for name in names:
        if name in TLS13_SUITES:
            continue
        if name not in CIPHER_SUITES:
            raise _fail(f"tls_server_config.cipher_suites: unknown or insecure cipher {name!r}")
        openssl.append(CIPHER_SUITES[name])
    if openssl:
        context.set_ciphers(":".join(openssl))
    if section.get("prefer_server_cipher_suites", True):
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _client_auth(context: ssl.SSLContext, section: Mapping[str, Any], mode: str, directory: Path) -> None:
    if mode in CLIENT_AUTH_UNSUPPORTED:
        raise _fail(
            f"tls_server_config.client_auth_type {mode} (a certificate without verification) is not "
            "supported: use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
    if mode not in CLIENT_AUTH:
        raise _fail(f"tls_server_config.client_auth_type: invalid value {mode!r}")
    has_ca = bool(section.get("client_ca_file") or section.get("client_ca"))
    if CLIENT_AUTH[mode] == ssl.CERT_NONE:
        if has_ca:
            raise _fail("tls_server_config: client CA configured without a client_auth_type")
        if section.get("client_allowed_sans"):
            raise _fail("tls_server_config.client_allowed_sans needs a verifying client_auth_type")
        return
    if not has_ca:
        raise _fail(f"tls_server_config.client_auth_type {mode} needs client_ca_file")
    try:
        if section.get("client_ca_file"):
            cafile = _file(directory, section["client_ca_file"], "client_ca_file")
            context.load_verify_locations(cafile=cafile)
        else:
            context.load_verify_locations(cadata=str(section["client_ca"]))
    except (ssl.SSLError, OSError) as exc:
        raise _fail(f"tls_server_config: cannot load the client CA: {exc}") from None
    context.verify_mode = CLIENT_AUTH[mode]


def _users(raw: Any) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail("basic_auth_users must map user names to bcrypt hashes")
    users: dict[str, bytes] = {}
    for user, hashed in raw.items():
        if not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            raise _fail(f"basic_auth_users.{user}: not a bcrypt hash (expected $2y$10$... of 60 characters)")
        users[str(user)] = hashed.encode()
    return users


def _headers(section: Mapping[str, Any]) -> dict[str, str]:
    # http2 is accepted for compatibility: aiohttp serves HTTP/1.1 either way.
    _only(section, {"headers", "http2"}, "http_server_config.")
    raw = section.get("headers") or {}
    if not isinstance(raw, dict):
        raise _fail("http_server_config.headers must be a mapping")
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if name not in HEADERS:
            raise _fail(f"http_server_config.headers: header {name!r} cannot be configured")
        allowed = HEADERS[name]
        if allowed is not None and value not in allowed:
            raise _fail(f"http_server_config.headers.{name}: expected one of {', '.join(allowed)}")
        if value:
            headers[name] = str(value)
    return headers


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes, caching outcomes.

    bcrypt at cost 10 takes ~50 ms of CPU; a scrape every 15 s would pay it each time. The cache is
    keyed by a SHA-256 of (user, stored hash, presented password), so it holds no password and a
    changed file never matches an old entry. Both successes and failures are cached (bounded), as the
    toolkit does; one bcrypt check runs at a time, in a thread, so the event loop keeps serving.
    """

    MAX_ENTRIES = 1024

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users: Mapping[str, bytes] = users
        self._cache: dict[bytes, bool] = {}
        self._lock = asyncio.Lock()
        self.bcrypt_checks = 0

    async def check(self, header: str) -> bool:
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user)
        known = hashed is not None
        stored = hashed if hashed is not None else FAKE_HASH
        key = hashlib.sha256(b"\0".join((user.encode(), stored, password))).digest()
        cached = self._cache.get(key)
        if cached is None:
            async with self._lock:
                self.bcrypt_checks += 1
                matched = await asyncio.to_thread(bcrypt.checkpw, password, stored)
            cached = known and matched
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()  # bounded: wrong passwords must not grow memory
            if self.MAX_ENTRIES:
                self._cache[key] = cached
        return cached


def _basic_credentials(header: str) -> tuple[str, bytes] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


def _peer_sans(request: web.Request) -> set[str]:
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    if not peer:
        return set()
    return {str(value) for _kind, value in peer.get("subjectAltName", ())}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(config: WebConfig, *, exempt: Iterable[str] = ()) -> Any:
    """aiohttp middleware: the file's headers on every response; basic auth and client-SAN checks on
    every path but ``/health/*`` and ``exempt`` (the webhook's ``/alerts`` keeps its bearer token)."""
    auth = BasicAuth(config.users)
    exempt_paths = frozenset(exempt)

    @web.middleware
    async def secure(request: web.Request, handler: Handler) -> web.StreamResponse:
        current = config.live.current() if config.live is not None else config
        auth.users = current.users
        open_path = request.path.startswith(HEALTH_PREFIX) or request.path in exempt_paths
        if not open_path:
            denied = await _deny(request, current, auth if current.users else None)
            if denied is not None:
                denied.headers.update(current.headers)
                return denied
        response = await handler(request)
        response.headers.update(current.headers)
        return response

    secure.basic_auth = auth  # type: ignore[attr-defined]  # the benchmark reads bcrypt_checks
    return secure


async def _deny(request: web.Request, config: WebConfig, auth: BasicAuth | None) -> web.Response | None:
    if config.client_allowed_sans and not (_peer_sans(request) & config.client_allowed_sans):
        return web.Response(status=403, text="client certificate has no allowed SAN\n")
    if auth is not None and not await auth.check(request.headers.get("Authorization", "")):
        return web.Response(
            status=401, text="Unauthorized\n", headers={"WWW-Authenticate": 'Basic realm="dict-rate-limit"'}
        )
    return None


def check_ports(
    config: WebConfig, metrics_port: int, health_port: int, receiver_port: int | None = None
) -> None:
    """Refuses port sharing the file cannot serve: the kubelet passes no client-certificate handshake,
    and the receiver's webhook port has its own TLS settings (RECEIVER_TLS_*)."""
    if config.requires_client_cert and metrics_port == health_port and metrics_port != 0:
        raise _fail(
            "client_auth_type RequireAndVerifyClientCert needs HEALTH_CHECK_PORT distinct from "
            "METRICS_PORT: the kubelet's probes present no client certificate"
        )
    if config.tls is not None and receiver_port is not None and receiver_port == metrics_port != 0:
        raise _fail(
            "tls_server_config needs METRICS_PORT distinct from RECEIVER_PORT (RECEIVER_TLS_* serve it)"
        )
