"""`dict-rate-limit exporter` as a process: budget refusal at start-up, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp

from devstack.embedded import free_port
from exporter.simulator.server import SimulatorServer

COMMAND = [sys.executable, "-m", "exporter.cli", "exporter"]


def environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CONFIG_FILE"}}
    env.update({"LISTEN_HOST": "127.0.0.1", "LOG_FORMAT": "json", **values})
    return env


async def test_polling_faster_than_the_budget_is_refused_with_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        env=environment(POLL_INTERVAL_SECONDS="10", METRICS_PORT=str(free_port())),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "POLL_INTERVAL_SECONDS" in lines[0]
    assert "POLICIES_LIST" in lines[0]
    assert stdout == b""


async def test_sigterm_stops_polling_and_exits_zero() -> None:
    sim = SimulatorServer(category="A")
    await sim.start()
    metrics_port, health_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        env=environment(
            BRIDGE_ADDRESS=sim.address,
            POLL_INTERVAL_SECONDS="1",
            POLL_BUDGET_OVERRIDE="true",
            METRICS_PORT=str(metrics_port),
            HEALTH_CHECK_PORT=str(health_port),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            deadline = time.monotonic() + 20
            ready = False
            while time.monotonic() < deadline and not ready:
                try:
                    async with http.get(f"http://127.0.0.1:{health_port}/health/ready") as response:
                        ready = response.status == 200
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            assert ready
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0
        assert time.monotonic() - started < 7.0  # in-flight poll bounded by min(5 s, interval)
        log = stderr.decode()
        assert "only for simulators and benchmarks" in log
        assert "exporter stopped" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await sim.stop()


async def test_prometheus_style_flags_choose_the_metrics_address_and_path() -> None:
    sim = SimulatorServer(category="A")
    await sim.start()
    metrics_port, health_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "--web.listen-address",
        f"127.0.0.1:{metrics_port}",
        "--web.telemetry-path",
        "/probe",
        "--log.level",
        "debug",
        env=environment(
            BRIDGE_ADDRESS=sim.address,
            METRICS_PORT="1",  # the flag wins over the variable
            HEALTH_CHECK_PORT=str(health_port),
            LOG_LEVEL="error",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            deadline = time.monotonic() + 20
            status = None
            while time.monotonic() < deadline and status != 200:
                try:
                    async with http.get(f"http://127.0.0.1:{metrics_port}/probe") as response:
                        status = response.status
                        body = await response.text()
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            assert status == 200
            assert "dict_rate_limit_bridge_up" in body
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                assert response.status == 404
            # The landing page links the exposition where it is served, not the default path.
            async with http.get(f"http://127.0.0.1:{metrics_port}/") as response:
                landing = await response.text()
            assert '<a href="/probe">/probe</a>' in landing
            assert 'href="/metrics"' not in landing
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0
        assert '"level": "debug"' in stderr.decode() or '"level":"debug"' in stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await sim.stop()
