"""Property-based fuzzing of webhook payloads (hypothesis): the validator only ever raises PayloadError, and
the running webhook on a real PostgreSQL never answers 5xx nor crashes; every rejection is a 4xx with a
reason."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import Settings
from exporter.receiver.payload import PayloadError, parse_payload
from exporter.receiver.webhook import create_app
from tests.support.receiver import AUTH, TOKEN, alert, migrate, payload, rows

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]

# Text that reaches PostgreSQL's limits: NUL, lone surrogates, non-ASCII, long strings.
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "\ud800", "ç€🙂", "x" * 300, "firing", "resolved", "critical", "4"]),
)
times = st.one_of(
    st.sampled_from(
        [
            "2026-11-23T09:00:00Z",
            "2026-11-23T09:00:00.123456789+03:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:60-23:59",
            "0000-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-23 09:00:00",
        ]
    ),
    texts,
    st.integers(),
    st.none(),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
string_maps = st.dictionaries(
    st.sampled_from(["alertname", "severity", "endpoint_id", "psp_category", "available_tokens", "capacity"])
    | texts,
    st.one_of(texts, st.sampled_from(["DICTRateLimitWarning", "warning", "critical", "-15", "1e400", "NaN"])),
    max_size=5,
)


@st.composite
def alerts(draw: st.DrawFn) -> Any:
    """Mostly well-formed alerts with some fields replaced by anything."""
    base = alert(
        draw(st.sampled_from(["firing", "resolved"])),
        fingerprint=draw(st.text(min_size=1, max_size=8)),
        ends_at=draw(st.sampled_from(["0001-01-01T00:00:00Z", "2026-11-23T09:05:00Z"])),
    )
    fields = draw(
        st.dictionaries(
            st.sampled_from(
                ["status", "labels", "annotations", "startsAt", "endsAt", "fingerprint", "generatorURL", "x"]
            ),
            st.one_of(json_values, times, string_maps),
            max_size=3,
        )
    )
    base.update(fields)
    return draw(st.one_of(st.just(base), json_values)) if draw(st.integers(0, 9)) == 0 else base


@st.composite
def documents(draw: st.DrawFn) -> Any:
    body = payload(*draw(st.lists(alerts(), max_size=4)), truncated=draw(st.integers(0, 3)))
    body.update(
        draw(
            st.dictionaries(
                st.sampled_from(["version", "alerts", "truncatedAlerts", "groupKey"]), json_values, max_size=2
            )
        )
    )
    return draw(st.one_of(st.just(body), json_values)) if draw(st.integers(0, 19)) == 0 else body


def encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=True).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents().map(encode), st.binary(max_size=64)))
def test_validation_accepts_or_raises_payload_error_only(body: bytes) -> None:
    try:
        parsed = parse_payload(body)
    except PayloadError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert str(error)
        assert error.reason in {"not_json", "unsupported_version", "invalid_field"}
        return
    for item in parsed.alerts:
        assert item.severity in {"critical", "warning", "info"}
        assert item.starts_at.tzinfo is not None


def _examples(count: int) -> list[bytes]:
    """Hypothesis-drawn bodies, collected first: the webhook part runs them inside one event loop."""
    collected: list[bytes] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(documents().map(encode), st.binary(max_size=64)))
    def collect(body: bytes) -> None:
        collected.append(body)

    collect()
    return collected


async def test_fuzzed_payloads_never_get_a_5xx_and_every_rejection_has_a_reason(
    aiohttp_client: MakeClient, database_url: str
) -> None:
    migrate(database_url)
    client = await aiohttp_client(
        create_app(Settings(database_url=database_url, webhook_bearer_token=TOKEN), relay=None)
    )
    statuses: dict[int, int] = {}
    for body in _examples(300):
        response = await client.post(
            "/alerts", data=body, headers={**AUTH, "Content-Type": "application/json"}
        )
        statuses[response.status] = statuses.get(response.status, 0) + 1
        assert response.status in {200, 400}, (response.status, body[:300])
        if response.status == 400:
            answer = await response.json()
            assert answer["error"], body[:300]
    assert statuses.get(200, 0) > 10, statuses
    assert statuses.get(400, 0) > 10, statuses
    # The service is still healthy and consistent after the storm.
    assert (await client.get("/health/ready")).status == 200
    assert rows(
        database_url, "SELECT count(*) FROM dict_rate_limit_alerts WHERE status NOT IN ('firing', 'resolved')"
    ) == [(0,)]
