"""The validator skips its walk over every string when the body has no escape (issue 18), and only then."""

from __future__ import annotations

import json

import pytest

from exporter.receiver.payload import PayloadError, parse_payload
from tests.support.receiver import alert, payload


def _body(extra: str, encoding: str = "utf-8") -> bytes:
    item = alert()
    item["extra"] = {"deep": [extra]}  # an unknown field: only the walk looks at it
    return json.dumps(payload(item), ensure_ascii=False).encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
@pytest.mark.parametrize(("text", "message"), [("a\x00b", "NUL"), ("a\ud800b", "unpaired surrogate")])
def test_escaped_nul_and_surrogates_in_unknown_fields_are_still_refused(
    encoding: str, text: str, message: str
) -> None:
    body = json.dumps(payload({**alert(), "extra": {"deep": [text]}})).encode(encoding)  # \u escapes
    with pytest.raises(PayloadError, match=message) as caught:
        parse_payload(body)
    assert caught.value.field == "alerts[0].extra.deep[0]"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_bodies_without_escapes_are_accepted_with_their_text(encoding: str) -> None:
    parsed = parse_payload(_body("caf\u00e9 \U0001f600", encoding))
    assert parsed.alerts[0].raw["extra"] == {"deep": ["caf\u00e9 \U0001f600"]}
