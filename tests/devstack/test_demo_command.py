"""``dict-rate-limit demo``: the subcommand issues 2 and 7 name, a launcher of the dev stack in a checkout."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import cli

CONSOLE_SCRIPT = Path(sys.executable).parent / "dict-rate-limit"


@pytest.mark.parametrize("command", [[str(CONSOLE_SCRIPT)], [sys.executable, "-m", "exporter.cli"]])
def test_demo_hands_over_to_the_dev_stack_of_the_checkout_from_any_directory(
    command: list[str], tmp_path: Path
) -> None:
    # A wrong duration is refused by `python -m devstack demo`'s own parser: its program name in the
    # message proves the subcommand reached the dev stack (from a directory that is not the checkout).
    done = subprocess.run(
        [*command, "demo", "--duration", "-1", "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "python -m devstack demo: error: argument --duration: must be >= 0" in done.stderr
    assert not (tmp_path / "state").exists()  # refused before starting anything


def test_demo_help_names_its_options() -> None:
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "demo", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert "--state-dir" in done.stdout
    assert "--duration" in done.stdout


def test_without_a_checkout_demo_exits_2_with_one_line_saying_where_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.run_demo(argparse.Namespace(state_dir=None, duration=None), candidates=[tmp_path])
    assert code == 2
    said = capsys.readouterr().err.strip()
    assert len(said.splitlines()) == 1
    assert "make demo" in said


def test_a_checkout_is_a_directory_holding_the_dev_stack(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "repo" / "devstack").mkdir(parents=True)
    (tmp_path / "repo" / "devstack" / "__main__.py").write_text("")
    assert cli.demo_checkout([tmp_path / "other", tmp_path / "repo"]) == tmp_path / "repo"
    assert cli.demo_checkout([tmp_path / "other"]) is None
