"""The process runtime every long-running command shares: signals, start-up failures, exit codes.

``run(command, serve)`` runs ``serve(stop)`` on a new event loop. SIGTERM and SIGINT set ``stop``; a signal
that arrives while ``serve`` is still starting (waiting for a database, binding ports) cancels it at once
instead of being ignored until start-up ends. Exit codes are the same for every command:

- 0: stopped by a signal (or ``serve`` returned);
- 1: could not start (a busy port, an unreachable dependency, an unmigrated database): one line on stderr
  ``dict-rate-limit <command>: cannot start: <reason>``, and the same at ERROR in the log;
- 2: invalid configuration (``ConfigError``, printed by the CLI).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A command cannot start; ``str()`` is the one line shown (no traceback)."""


class StopSignal(asyncio.Event):
    """Set by SIGTERM/SIGINT. ``serving`` turns true when ``serve`` first waits on it: start-up is over."""

    serving = False

    async def wait(self) -> bool:  # type: ignore[override]  # same contract, marks the end of start-up
        self.serving = True
        return await super().wait()


Serve = Callable[[StopSignal], Awaitable[None]]


def describe(exc: BaseException) -> str:
    """One line for a start-up failure; a busy port says so plainly (aiohttp and gRPC word it differently)."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"address already in use ({exc.strerror})" if exc.strerror else "address already in use"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _main(serve: Serve) -> None:
    stop = StopSignal()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stop.set()
        if not stop.serving and task is not None:
            log.info("signal received during start-up, stopping")
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await serve(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run(command: str, serve: Serve, *, startup_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Runs ``serve`` until it returns; see the module docstring for signals and exit codes."""
    failures: tuple[type[BaseException], ...] = (StartupError, OSError, *startup_errors)
    try:
        asyncio.run(_main(serve))
    except asyncio.CancelledError:
        return 0  # a signal during start-up
    except failures as exc:
        line = describe(exc)
        log.error("%s cannot start: %s", command, line)
        print(f"dict-rate-limit {command}: cannot start: {line}", file=sys.stderr)
        return 1
    return 0
