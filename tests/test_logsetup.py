"""Logs: one JSON object per line with a UTC timestamp, or a short human line on terminals."""

from __future__ import annotations

import json
import logging
from datetime import datetime

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
