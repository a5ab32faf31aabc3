"""A real Pulsar broker (pulsar-lite) on loopback for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.embedded import EmbeddedPulsar
from tests.support.env import unavailable


@pytest.fixture(scope="session")
def pulsar_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPulsar]:
    broker = EmbeddedPulsar(tmp_path_factory.mktemp("pulsar"))
    try:
        broker.start()
    except Exception as exc:  # pragma: no cover
        unavailable("embedded Pulsar broker", exc)
        raise
    yield broker
    broker.stop()
