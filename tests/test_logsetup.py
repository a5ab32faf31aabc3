"""Logs: one JSON object per line with a UTC timestamp, or a short human line on terminals."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timedelta

import pytest

from exporter import logsetup


def _record(msg: str, ctx: dict[str, object] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("exporter.service.poller", logging.WARNING, __file__, 1, msg, (), None)
    if ctx is not None:
        record.ctx = ctx
    return record


def test_json_lines_carry_utc_time_level_logger_message_and_context() -> None:
    line = logsetup.JsonFormatter().format(_record("poll failed", {"code": "UNAVAILABLE", "attempts": 3}))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "warning"
    assert entry["logger"] == "exporter.service.poller"
    assert entry["msg"] == "poll failed"
    assert entry["code"] == "UNAVAILABLE"
    assert entry["attempts"] == 3
    assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None
    assert datetime.fromisoformat(entry["ts"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_human_lines_are_short_and_keep_the_context() -> None:
    line = logsetup.HumanFormatter().format(_record("poll failed", {"code": "UNAVAILABLE"}))
    assert line.endswith("WARN exporter.service.poller: poll failed code=UNAVAILABLE")
    assert line[8] == "Z"  # HH:MM:SSZ: UTC, said so


def test_logfmt_lines_are_key_value_pairs_as_prometheus_writes_them() -> None:
    record = _record("poll failed", {"code": "UNAVAILABLE", "detail": 'say "no"\nnext'})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = logsetup.LogfmtFormatter().format(record)
    assert "\n" not in line  # the traceback's newlines too are escaped: one record, one line
    assert line.startswith("ts=")
    stamp = datetime.fromisoformat(line.split()[0].removeprefix("ts=").replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert ' level=warn logger=exporter.service.poller msg="poll failed" code=UNAVAILABLE ' in line
    assert 'detail="say \\"no\\"\\nnext"' in line
    assert ' exc="Traceback' in line
    assert "RuntimeError: boom" in line


@pytest.mark.parametrize("hostile", ["a b=c", 'x" level=error msg="forged', "x\ny", "\udc80", "\x1b[31m"])
def test_a_hostile_value_can_never_forge_a_logfmt_pair_or_line(hostile: str) -> None:
    line = logsetup.LogfmtFormatter().format(_record("alert", {"endpoint_id": hostile}))
    assert "\n" not in line
    line.encode()  # always writable: a lone surrogate is escaped, not passed on
    assert line.split()[1] == "level=warn"
    value = line.split(" endpoint_id=", 1)[1]  # the rest of the line is that one quoted value
    assert value.startswith('"')
    assert json.loads(value) == hostile.encode("utf-8", "backslashreplace").decode()


def test_setup_installs_one_handler_at_the_requested_level(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logsetup.setup("warning", "json")
        logging.getLogger("exporter.test").info("hidden")
        logging.getLogger("exporter.test").warning("shown")
        lines = capsys.readouterr().err.strip().splitlines()
        assert [json.loads(line)["msg"] for line in lines] == ["shown"]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


@pytest.mark.parametrize(
    "hostile",
    ["X\n12:00:00Z ERRO exporter.receiver: forged", "X\r\x1b[2Kforged", "X\u2028forged", "a b=c", 'q"'],
)
def test_a_hostile_value_can_never_forge_a_human_log_line(hostile: str) -> None:
    line = logsetup.HumanFormatter().format(_record(f"alert {hostile}", {"endpoint_id": hostile, "n": 1}))
    for control in ("\n", "\r", "\x1b", "\u2028"):
        assert control not in line
    # Each context value is one token: the only key=value pairs are the real ones.
    assert line.endswith(" n=1")
    assert " endpoint_id=" in line
    tail = line.split(" endpoint_id=", 1)[1].removesuffix(" n=1")
    assert tail.startswith('"') or " " not in tail


def test_repeated_warnings_pass_once_per_interval_and_count_the_rest() -> None:
    now = [100.0]
    repeat = logsetup.RepeatFilter(interval=10.0, clock=lambda: now[0])
    passed = [repeat.filter(_record("accept failed: %s")) for _ in range(500)]
    assert passed.count(True) == 1
    other = _record("another failure")
    assert repeat.filter(other)  # a different message is not muted by the flood
    now[0] += 10.0
    after = _record("accept failed: %s")
    assert repeat.filter(after)
    assert after.ctx == {"suppressed": 499}  # type: ignore[attr-defined]
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "alert %s", (), None)
    assert all(repeat.filter(info) for _ in range(5))
