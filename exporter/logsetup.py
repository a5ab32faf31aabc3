"""Logging: one JSON object per line (UTC) for machines, a short human format for terminals.

Log records never carry personal data (CPF/CNPJ, Pix keys): the product only ever sees policy names,
counts and DICT correlation ids, and callers pass structured context through ``extra={"ctx": {...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

#: Context every record logged from the current task carries: a multi-participant exporter runs each
#: participant's poller and lease under ``{"participant": name}`` (tasks inherit it when created).
log_context: ContextVar[dict[str, str]] = ContextVar("log_context", default={})  # noqa: B039 - never mutated


class ContextFilter(logging.Filter):
    """Adds :data:`log_context` to the record's ``ctx`` (the record's own keys win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        extra = log_context.get()
        if extra:
            ctx = getattr(record, "ctx", None)
            record.ctx = {**extra, **(ctx if isinstance(ctx, dict) else {})}
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = getattr(record, "ctx", None)
        if isinstance(ctx, dict):
            entry.update(ctx)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


#: C0 and C1 control characters, DEL and the Unicode line/paragraph separators: each could end a line or
#: drive a terminal (escape codes), so a value from outside (an endpoint_id...) could forge log lines.
_UNSAFE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` on one line, control characters shown as ``\\xNN`` escapes."""
    return _UNSAFE.sub(_escape_char, str(text))


def _field(value: object) -> str:
    text = printable(value)
    # A value with a space or '=' is quoted, so it can never pass for another key=value pair.
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%SZ")
        line = f"{stamp} {record.levelname[:4]:<4} {record.name}: {printable(record.getMessage())}"
        ctx = getattr(record, "ctx", None)
        if isinstance(ctx, dict) and ctx:
            line += " " + " ".join(f"{printable(k)}={_field(v)}" for k, v in ctx.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: go-kit's level names, which Prometheus' own logfmt lines use.
_LOGFMT_LEVELS = {"WARNING": "warn", "CRITICAL": "error"}


class LogfmtFormatter(logging.Formatter):
    """``--log.format logfmt``: key=value pairs as Prometheus and its exporters write them (ts, level, msg).

    Values are quoted and escaped as in the human format, and a traceback goes in ``exc`` with its newlines
    escaped: a line is always one record.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        pairs: list[tuple[object, object]] = [
            ("ts", stamp.replace("+00:00", "Z")),
            ("level", _LOGFMT_LEVELS.get(record.levelname, record.levelname.lower())),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        ctx = getattr(record, "ctx", None)
        if isinstance(ctx, dict):
            pairs.extend(ctx.items())
        if record.exc_info:
            pairs.append(("exc", self.formatException(record.exc_info)))
        return " ".join(f"{printable(k)}={_logfmt_value(v)}" for k, v in pairs)


def _logfmt_value(value: object) -> str:
    # logfmt's quoting: bare when nothing could end the value, else a quoted string with JSON's escapes
    # (\" \\ \n and \u00XX for other control characters), so a value never forges another pair or line.
    text = str(value).encode("utf-8", "backslashreplace").decode()  # a lone surrogate as \udXXX text
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Lets the same warning or error (logger, level and message template) through once per ``interval``.

    A flood of one failure (a connection storm, a poison input retried) must not bury everything else
    nor fill the disk: the first line passes at once, repeats within the interval are counted, and the
    next line that passes says how many were suppressed (``suppressed`` in its context). INFO and below
    pass untouched: they are events (one per alert), not a repeated failure.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._seen: dict[tuple[str, int, str, tuple[tuple[str, str], ...]], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # Per task context too: one participant's failing Bridge must not silence another's same failure.
        key = (record.name, record.levelno, str(record.msg), tuple(sorted(log_context.get().items())))
        now = self._clock()
        last, suppressed = self._seen.get(key, (-float("inf"), 0))
        if now - last < self._interval:
            self._seen[key] = (last, suppressed + 1)
            return False
        if len(self._seen) > 1000:  # bounded: templates are few, but never trust that
            self._seen.clear()
        self._seen[key] = (now, 0)
        if suppressed:
            ctx = getattr(record, "ctx", None)
            record.ctx = {**(ctx if isinstance(ctx, dict) else {}), "suppressed": suppressed}
        return True


def setup(level: str = "info", fmt: str = "auto") -> None:
    """Configures the root logger once per process (called by the CLI, never at import time)."""
    if fmt == "auto":
        fmt = "human" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    formatters = {"human": HumanFormatter, "logfmt": LogfmtFormatter}
    handler.setFormatter(formatters.get(fmt, JsonFormatter)())
    handler.addFilter(ContextFilter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO and say nothing an operator acts on.
    for noisy in ("aiohttp.access", "pulsar", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    quiet_grpc()


def quiet_grpc() -> None:
    """grpc's C core writes its own lines to stderr ("I1201 12:00:00.000 ... Handshake failed"), outside
    these formats: keep only its errors. It reads GRPC_VERBOSITY once, when grpc is first imported, so the
    CLI calls this before reading the configuration (which can import grpc); a GRPC_VERBOSITY set wins."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
