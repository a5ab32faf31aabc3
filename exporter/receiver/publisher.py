"""A Pulsar producer for asyncio: the blocking C++ client runs in threads, acks come back as futures.

``pulsar-client`` blocks in ``Client``/``create_producer`` (up to the operation timeout while the broker is
down) and calls ``send_async`` callbacks from its own I/O thread. So connecting and closing happen in a
worker thread, and each callback hands its result to the event loop with ``call_soon_threadsafe``. A
callback must never raise (the library would abort the process), hence the guard in :meth:`_on_ack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulsar

from exporter.receiver.metrics import ReceiverMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    body: bytes
    key: str
    properties: dict[str, str]


class PulsarPublisher:
    """One client and producer on ``topic``, created on demand and dropped after a failure."""

    def __init__(
        self,
        url: str,
        topic: str,
        metrics: ReceiverMetrics,
        *,
        auth_token: str | None = None,
        send_timeout_ms: int = 5000,
        operation_timeout_s: int = 5,
    ) -> None:
        self.url, self.topic = url, topic
        self._metrics = metrics
        self._auth_token = auth_token
        self._send_timeout_ms = send_timeout_ms
        self._operation_timeout_s = operation_timeout_s
        self._client: Any = None
        self._producer: Any = None

    def connected(self) -> bool:
        return self._producer is not None and bool(self._producer.is_connected())

    async def ensure_connected(self) -> None:
        if self._producer is None:
            await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        auth = pulsar.AuthenticationToken(self._auth_token) if self._auth_token else None
        client = pulsar.Client(
            self.url,
            authentication=auth,
            operation_timeout_seconds=self._operation_timeout_s,
            connection_timeout_ms=self._operation_timeout_s * 1000,
            logger=_client_logger(),
            **tls_options(self.url),
        )
        try:
            producer = client.create_producer(
                self.topic,
                send_timeout_millis=self._send_timeout_ms,
                # No batching: every message keeps its own key on the wire, which Key_Shared subscriptions
                # need, and pipelined async sends already reach ~12k msg/s here (key-based batching: ~11k,
                # default batching: ~35k but it routes a whole batch by its first key).
                batching_enabled=False,
                max_pending_messages=20000,
                block_if_queue_full=False,
            )
        except Exception:
            client.close()
            raise
        self._client, self._producer = client, producer
        log.info("connected to Pulsar", extra={"ctx": {"url": self.url, "topic": self.topic}})

    async def publish(self, messages: Sequence[Message]) -> list[str | None]:
        """Sends every message; per message, None once acknowledged or the error's name."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("not connected")
        batch = _Batch(asyncio.get_running_loop(), len(messages), self._metrics)
        for index, message in enumerate(messages):
            try:
                producer.send_async(
                    message.body,
                    functools.partial(batch.acked, index, time.perf_counter()),
                    properties=message.properties,
                    partition_key=message.key,
                )
            except Exception as exc:  # a closed producer raises here, not in the callback
                batch.acked(index, 0.0, f"{type(exc).__name__}: {exc}", None)
        return await batch.done

    async def reset(self) -> None:
        """Drops the client after a failure; the next publish reconnects from scratch."""
        client, self._client, self._producer = self._client, None, None
        if client is not None:
            await asyncio.to_thread(_close_quietly, client)

    async def close(self) -> None:
        producer = self._producer
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(producer.flush)
        await self.reset()


class _Batch:
    """Collects the acks of one batch; the loop is woken once, by the last ack (not once per message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, metrics: ReceiverMetrics) -> None:
        self._loop = loop
        self._metrics = metrics
        self.results: list[str | None] = ["not acknowledged"] * size
        self._pending = size
        self._lock = threading.Lock()
        self.done: asyncio.Future[list[str | None]] = loop.create_future()
        if size == 0:
            self.done.set_result([])

    def acked(self, index: int, sent: float, result: Any, _message_id: Any) -> None:
        # Runs on the client's I/O thread: never let an exception escape (the library would abort).
        try:
            ok = result == pulsar.Result.Ok
            self.results[index] = None if ok else result_name(result)
            if ok:
                self._metrics.publish_duration.observe(time.perf_counter() - sent)
            with self._lock:
                self._pending -= 1
                last = self._pending == 0
            if last:
                self._loop.call_soon_threadsafe(_settle, self.done, self.results)
        except Exception:  # noqa: S110 - the loop is closed: nobody waits for this ack any more
            pass


def tls_options(url: str) -> dict[str, bool]:
    """With TLS (``pulsar+ssl://``), certificates *and* the broker's hostname are verified.

    The client checks the chain by default but not the name (``tls_validate_hostname`` is False), so any
    certificate of a trusted CA would do for a man in the middle.
    """
    if url.lower().startswith("pulsar+ssl://"):
        return {"tls_validate_hostname": True, "tls_allow_insecure_connection": False}
    return {}


def result_name(result: Any) -> str:
    """``MessageTooBig`` for ``pulsar.Result.MessageTooBig``: the bare name, a bounded metric label."""
    name = getattr(result, "name", None)
    return name if isinstance(name, str) else str(result)


def _client_logger() -> logging.Logger:
    # The C++ client logs every connection at INFO; keep its warnings and errors unless asked for more.
    logger = logging.getLogger("pulsar")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return logger


def _settle(future: asyncio.Future[list[str | None]], results: list[str | None]) -> None:
    if not future.done():
        future.set_result(results)


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close()
