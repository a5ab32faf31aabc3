"""A Pulsar producer for asyncio: the blocking C++ client runs in threads, acks come back as futures.

``pulsar-client`` blocks in ``Client``/``create_producer`` (up to the operation timeout while the broker is
down) and calls ``send_async`` callbacks from its own I/O thread. So connecting and closing happen in a
worker thread, and each callback hands its result to the event loop with ``call_soon_threadsafe``. A
callback must never raise (the library would abort the process), hence the guard in :meth:`_on_ack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulsar

from exporter.receiver_metrics import ReceiverMetrics

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
        )
        try:
            producer = client.create_producer(
                self.topic,
                send_timeout_millis=self._send_timeout_ms,
                # Key-based batches keep each key's messages together and in order (Key_Shared consumers).
                batching_enabled=True,
                batching_type=pulsar.BatchingType.KeyBased,
                batching_max_publish_delay_ms=5,
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
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[str | None]] = []
        for message in messages:
            future: asyncio.Future[str | None] = loop.create_future()
            futures.append(future)
            sent = time.perf_counter()
            try:
                producer.send_async(
                    message.body,
                    lambda result, _msg_id, f=future, t=sent: self._on_ack(loop, f, t, result),
                    properties=message.properties,
                    partition_key=message.key,
                )
            except Exception as exc:  # a closed producer raises here, not in the callback
                future.set_result(f"{type(exc).__name__}: {exc}")
        return list(await asyncio.gather(*futures))

    def _on_ack(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str | None], sent: float, result: Any
    ) -> None:
        # Runs on the client's I/O thread: hand over to the loop, and never let an exception escape.
        try:
            outcome = None if result == pulsar.Result.Ok else str(result)
            if outcome is None:
                self._metrics.publish_duration.observe(time.perf_counter() - sent)
            loop.call_soon_threadsafe(_settle, future, outcome)
        except Exception:  # noqa: S110 - the loop is closed: nobody waits for this ack any more
            pass

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


def _client_logger() -> logging.Logger:
    # The C++ client logs every connection at INFO; keep its warnings and errors unless asked for more.
    logger = logging.getLogger("pulsar")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return logger


def _settle(future: asyncio.Future[str | None], outcome: str | None) -> None:
    if not future.done():
        future.set_result(outcome)


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close()
