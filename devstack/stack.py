"""The whole stack on 127.0.0.1 as child processes: what `make demo` and the e2e test run.

PostgreSQL (embedded, migrated), Pulsar (embedded pulsar-lite), the Bridge simulator, the exporter, the
receiver, Alertmanager and Prometheus, each on a free loopback port, each logging to ``logs/<name>.log``
under one state directory. Rules and the Alertmanager configuration are rendered from the bundle's own
files with shorter ``for:`` durations and one-second grouping (``Timings``), so alerts arrive in seconds.
Any of PostgreSQL, Pulsar or the Bridge can be supplied instead (the tests pass their fixtures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

from devstack.alertmanager_config import render_alertmanager_config
from devstack.embedded import EmbeddedPostgres, EmbeddedPulsar, free_port, wait_for_port
from devstack.processes import ChildProcess, http_json, wait_until_ok
from exporter.config import DEFAULT_PULSAR_TOPIC, KEYS
from exporter.history import migrations
from exporter.rules.render import RULES_DIR, render_fast_rules

log = logging.getLogger(__name__)

DEMO_DATABASE = "dict_rate_limit_demo"
#: Variables of ours a caller's environment must not leak into the children (CI sets DATABASE_URL).
_OWN_ENV = {key.env for key in KEYS} | {key.env + "_FILE" for key in KEYS} | {"CONFIG_FILE"}
#: Per-run directories, wiped at start so every run begins clean (the PostgreSQL server's is reused).
_RUN_DIRS = ("logs", "prometheus", "alertmanager", "pulsar", "receiver")


class StackError(RuntimeError):
    """A component is missing or did not start; the message says which and where its log is."""


@dataclass(frozen=True, slots=True)
class Timings:
    """How fast the stack reacts. ``alert_for`` is ``render_fast_rules``' for_scale (factor or mapping)."""

    poll_interval: float = 10.0
    poll_lead: float = 1.0
    scrape_interval: float = 10.0
    evaluation_interval: float = 5.0
    alert_for: float | Mapping[str, str] = 0.05


@dataclass
class Ports:
    """Loopback ports, each taken just before its component starts (a port found free long before it is
    bound may meanwhile be taken by someone else on a busy machine)."""

    simulator: int = 0
    exporter_metrics: int = 0
    exporter_health: int = 0
    receiver_webhook: int = 0
    receiver_metrics: int = 0
    receiver_health: int = 0
    alertmanager: int = 0
    prometheus: int = 0

    def take(self, *names: str) -> None:
        for name in names:
            setattr(self, name, free_port())


def prometheus_duration(seconds: float) -> str:
    """Prometheus durations have no fractions: 0.5 s is written 500ms."""
    return f"{seconds:g}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def find_binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(
        f"{names[0]} is not installed: run `make demo` (it installs prometheus and alertmanager)"
    )


class Stack:
    """Starts the components in dependency order and stops them in reverse; ``stop()`` is idempotent."""

    def __init__(
        self,
        state_dir: Path,
        timings: Timings | None = None,
        *,
        scenario: str | None = "default",
        topic: str = DEFAULT_PULSAR_TOPIC,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.timings = timings or Timings()
        self.scenario = scenario
        self.topic = topic
        self.ports = Ports()
        self.children: list[ChildProcess] = []
        self.database_url = ""
        self.pulsar_url = ""
        self.bridge_address = ""
        self._postgres: EmbeddedPostgres | None = None
        self._pulsar: EmbeddedPulsar | None = None

    # --- lifecycle

    def start(
        self,
        *,
        database_url: str | None = None,
        pulsar_url: str | None = None,
        bridge_address: str | None = None,
    ) -> None:
        try:
            self._prepare_dirs()
            self.database_url = database_url or self._start_postgres()
            migrations.apply(self.database_url)
            self.pulsar_url = pulsar_url or self._start_pulsar()
            self.bridge_address = bridge_address or self._start_simulator()
            self._start_exporter()
            self._start_receiver()
            self._start_alertmanager()
            self._start_prometheus()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for child in reversed(self.children):
            code = child.stop()
            log.debug("stopped %s (exit %s)", child.name, code)
        self.children.clear()
        if self._pulsar is not None:
            self._pulsar.stop()
            self._pulsar = None
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None

    def dead(self) -> list[ChildProcess]:
        """Children that exited although nobody stopped them."""
        return [child for child in self.children if not child.alive()]

    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "Prometheus (alerts)": f"http://127.0.0.1:{p.prometheus}/alerts",
            "Alertmanager": f"http://127.0.0.1:{p.alertmanager}/#/alerts",
            "Exporter metrics": f"http://127.0.0.1:{p.exporter_metrics}/metrics",
            "Exporter policies API": f"http://127.0.0.1:{p.exporter_metrics}/api/v1/policies",
            "Receiver metrics": f"http://127.0.0.1:{p.receiver_metrics}/metrics",
            "Bridge simulator (gRPC)": self.bridge_address,
            "Pulsar": f"{self.pulsar_url} topic {self.topic}",
            "PostgreSQL": self.database_url,
            "Logs": str(self.state_dir / "logs"),
        }

    # --- components

    def _prepare_dirs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover_broker()
        for name in _RUN_DIRS:
            shutil.rmtree(self.state_dir / name, ignore_errors=True)

    def _start_postgres(self) -> str:
        self._postgres = EmbeddedPostgres(self.state_dir / "postgres")
        admin_url = self._postgres.start()
        # A fresh database per run; the server's data directory is reused (starting it again takes 0.1 s).
        with psycopg.connect(admin_url, autocommit=True) as conn:
            name = sql.Identifier(DEMO_DATABASE)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
        return psycopg.conninfo.make_conninfo(admin_url, dbname=DEMO_DATABASE)

    def _start_pulsar(self) -> str:
        self._pulsar = EmbeddedPulsar(self.state_dir / "pulsar")
        url = self._pulsar.start()
        # Children of ours die with us (PR_SET_PDEATHSIG); the broker does not: remember it for the next run.
        if self._pulsar.pid is not None:
            self._broker_pid_file.write_text(str(self._pulsar.pid), encoding="utf-8")
        return url

    @property
    def _broker_pid_file(self) -> Path:
        return self.state_dir / "pulsar-broker.pid"

    def _stop_leftover_broker(self) -> None:
        """The broker of a run that was SIGKILLed, if it still runs (its command line names our directory)."""
        try:
            pid = int(self._broker_pid_file.read_text(encoding="utf-8"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.state_dir / "pulsar").encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._broker_pid_file.unlink(missing_ok=True)

    def _child(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> ChildProcess:
        child = ChildProcess(name, argv, self.state_dir / "logs" / f"{name}.log", env=env, cwd=self.state_dir)
        child.start()
        self.children.append(child)
        return child

    def _command(self, name: str, **keys: str | float) -> ChildProcess:
        """A ``dict-rate-limit`` subcommand of this interpreter, configured through its environment."""
        env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV}
        env.update({"LOG_FORMAT": "json", "LISTEN_HOST": "127.0.0.1"})
        env.update({key: str(value) for key, value in keys.items()})
        return self._child(name, [sys.executable, "-m", "exporter.cli", name], env)

    def _start_simulator(self) -> str:
        self.ports.take("simulator")
        listen = f"127.0.0.1:{self.ports.simulator}"
        child = self._command("simulator", SIMULATOR_LISTEN=listen, SIMULATOR_SCENARIO=self.scenario or "")
        try:
            wait_for_port("127.0.0.1", self.ports.simulator, 20, child.process)
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(f"simulator did not start: {exc}\n{child.tail()}") from None
        return listen

    def _start_exporter(self) -> None:
        self.ports.take("exporter_metrics", "exporter_health")
        t, p = self.timings, self.ports
        child = self._command(
            "exporter",
            BRIDGE_ADDRESS=self.bridge_address,
            POLL_INTERVAL_SECONDS=t.poll_interval,
            POLL_LEAD_SECONDS=t.poll_lead,
            # A simulator, not DICT: polling faster than the safe budget is the point of a demo.
            POLL_BUDGET_OVERRIDE="true",
            METRICS_PORT=p.exporter_metrics,
            HEALTH_CHECK_PORT=p.exporter_health,
            DATABASE_URL=self.database_url,
        )
        wait_until_ok(f"http://127.0.0.1:{p.exporter_health}/health/ready", 30 + 2 * t.poll_interval, child)

    @property
    def token_file(self) -> Path:
        return self.state_dir / "receiver" / "webhook-token"

    def _start_receiver(self) -> None:
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(secrets.token_urlsafe(32), encoding="utf-8")
        self.token_file.chmod(0o600)
        self.ports.take("receiver_webhook", "receiver_metrics", "receiver_health")
        p = self.ports
        child = self._command(
            "receiver",
            RECEIVER_PORT=p.receiver_webhook,
            METRICS_PORT=p.receiver_metrics,
            HEALTH_CHECK_PORT=p.receiver_health,
            DATABASE_URL=self.database_url,
            PULSAR_URL=self.pulsar_url,
            PULSAR_TOPIC=self.topic,
            WEBHOOK_BEARER_TOKEN_FILE=str(self.token_file),
        )
        wait_until_ok(f"http://127.0.0.1:{p.receiver_health}/health/ready", 30, child)

    def _start_alertmanager(self) -> None:
        directory = self.state_dir / "alertmanager"
        config = render_alertmanager_config(
            f"http://127.0.0.1:{self.ports.receiver_webhook}/alerts",
            self.token_file,
            directory / "alertmanager.yml",
            fast=True,
        )
        self.ports.take("alertmanager")
        address = f"127.0.0.1:{self.ports.alertmanager}"
        child = self._child(
            "alertmanager",
            [
                find_binary("prometheus-alertmanager", "alertmanager"),
                f"--config.file={config}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address={address}",
                f"--web.external-url=http://{address}/",
                "--cluster.listen-address=",  # no gossip port on 0.0.0.0:9094
            ],
        )
        wait_until_ok(f"http://{address}/-/ready", 30, child)

    def prometheus_config(self) -> Path:
        directory = self.state_dir / "prometheus"
        render_fast_rules(RULES_DIR, directory / "rules", self.timings.alert_for)
        t, p = self.timings, self.ports
        config = {
            "global": {
                "scrape_interval": prometheus_duration(t.scrape_interval),
                "scrape_timeout": prometheus_duration(min(t.scrape_interval, 10)),
                "evaluation_interval": prometheus_duration(t.evaluation_interval),
            },
            "rule_files": [str(directory / "rules" / "*.rules.yml")],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{p.alertmanager}"]}]}]
            },
            # Job names are the ones the rules expect (rules/*.rules.yml headers).
            "scrape_configs": [
                {
                    "job_name": "dict-rate-limit-exporter",
                    "static_configs": [{"targets": [f"127.0.0.1:{p.exporter_metrics}"]}],
                },
                {
                    "job_name": "dict-rate-limit-receiver",
                    "static_configs": [{"targets": [f"127.0.0.1:{p.receiver_metrics}"]}],
                },
            ],
        }
        path = directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def _start_prometheus(self) -> None:
        self.ports.take("prometheus")
        config = self.prometheus_config()
        address = f"127.0.0.1:{self.ports.prometheus}"
        child = self._child(
            "prometheus",
            [
                find_binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.state_dir / 'prometheus' / 'data'}",
                f"--web.listen-address={address}",
                f"--web.external-url=http://{address}/",
            ],
        )
        wait_until_ok(f"http://{address}/-/ready", 30, child)
        self._wait_prometheus_wired(f"http://{address}", child)

    def _wait_prometheus_wired(self, base: str, child: ChildProcess) -> None:
        """Both targets scraped and Alertmanager discovered (the first discovery takes ~5 s)."""
        deadline = time.monotonic() + 30 + 2 * self.timings.scrape_interval
        while time.monotonic() < deadline:
            if not child.alive():
                raise StackError(f"prometheus exited:\n{child.tail()}")
            targets = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            managers = http_json(f"{base}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
            if len(targets) == 2 and all(t["health"] == "up" for t in targets) and managers:
                return
            time.sleep(0.2)
        raise StackError(
            f"prometheus did not scrape both targets and find Alertmanager (log: {child.log_path})"
        )
