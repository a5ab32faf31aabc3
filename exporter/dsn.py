"""Connection strings without their secrets: parsed the way libpq parses them, never by pattern.

libpq accepts two forms (PostgreSQL docs, "Connection Strings"): a URI
``postgresql://[user[:password]@][host][:port][/dbname][?key=value&...]`` whose parts are
percent-encoded, and ``key = value`` pairs separated by white space, where white space around ``=`` is
allowed and a value may be single-quoted with backslash escapes. A password can sit in the user part of
the URI, in a ``password`` (or ``sslpassword``) parameter of either form, or anywhere in a string libpq
refuses (its error then quotes the offending token, so :func:`redact` must hide it too).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import unquote

MASK = "***"
SECRET_KEYS = frozenset({"password", "sslpassword"})
_URI = re.compile(r"^(postgres(?:ql)?://)(.*)$", re.DOTALL | re.IGNORECASE)
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class _Masked:
    text: str  # the string with every secret replaced by MASK
    secrets: tuple[str, ...]  # the raw (and decoded) secret texts, to scrub from error messages


def mask_dsn(dsn: str) -> str:
    """``dsn`` with every password replaced by ``***`` (an unparseable rest is hidden entirely)."""
    return _mask(dsn).text


def redact(text: str, dsn: str | None) -> str:
    """``text`` (an error message, a log line) with every secret of ``dsn`` replaced by ``***``."""
    if not dsn:
        return text
    for secret in sorted(_mask(dsn).secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def _mask(dsn: str) -> _Masked:
    match = _URI.match(dsn)
    if match:
        return _mask_uri(match[1], match[2])
    return _mask_keywords(dsn)


def _decoded(raw: str) -> list[str]:
    """The raw text and, when it is valid percent-encoding, its decoded form."""
    if _PERCENT.search(raw):
        return [raw]  # libpq refuses it and quotes it raw in the error
    return [raw, unquote(raw)]


def _mask_uri(scheme: str, rest: str) -> _Masked:
    secrets: list[str] = []
    # libpq: the user part ends at the first '@' met before any '/', '?' (the host part follows it).
    head_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    at = rest.find("@", 0, head_end)
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon:
            secrets += _decoded(password)
            rest = f"{user}:{MASK}{rest[at:]}"
    base, question, query = rest.partition("?")
    if not question:
        return _Masked(scheme + base, tuple(secrets))
    pairs = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        decoded_key = key if _PERCENT.search(key) else unquote(key)
        # A key libpq cannot decode makes the whole string invalid: hide its value too.
        if equals and (decoded_key.strip().lower() in SECRET_KEYS or _PERCENT.search(key)):
            secrets += _decoded(value)
            value = MASK
        pairs.append(f"{key}{equals}{value}")
    return _Masked(f"{scheme}{base}?{'&'.join(pairs)}", tuple(secrets))


def _mask_keywords(dsn: str) -> _Masked:
    """libpq's conninfo_parse: keyword, optional blanks, '=', optional blanks, plain or quoted value."""
    out: list[str] = []
    secrets: list[str] = []
    i, n = 0, len(dsn)
    while i < n:
        start = i
        while i < n and dsn[i].isspace():
            i += 1
        key_start = i
        while i < n and not dsn[i].isspace() and dsn[i] != "=":
            i += 1
        key = dsn[key_start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if not key:
            out.append(dsn[start:i])
            break
        if i >= n or dsn[i] != "=":
            return _unparseable(out, dsn[key_start:], secrets)
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        value_start = i
        value, i, closed = _value(dsn, i)
        if not closed:
            return _unparseable(out, dsn[key_start:], secrets)
        if key.lower() in SECRET_KEYS:
            secrets += [dsn[value_start:i], value]
            out.append(dsn[start:value_start] + MASK)
        else:
            out.append(dsn[start:i])
    return _Masked("".join(out), tuple(secrets))


def _value(dsn: str, i: int) -> tuple[str, int, bool]:
    """The unescaped value starting at ``i``, the index after it, and False for an unclosed quote."""
    chars: list[str] = []
    n = len(dsn)
    if i < n and dsn[i] == "'":
        i += 1
        while i < n:
            if dsn[i] == "\\" and i + 1 < n:
                chars.append(dsn[i + 1])
                i += 2
            elif dsn[i] == "'":
                return "".join(chars), i + 1, True
            else:
                chars.append(dsn[i])
                i += 1
        return "".join(chars), i, False
    while i < n and not dsn[i].isspace():
        if dsn[i] == "\\" and i + 1 < n:
            i += 1
        chars.append(dsn[i])
        i += 1
    return "".join(chars), i, True


def _unparseable(out: list[str], rest: str, secrets: list[str]) -> _Masked:
    # libpq refuses the string from here on and its error quotes a token of it: any of them may be the
    # password someone mistyped, so none is shown and every one is scrubbed from messages.
    secrets += [token for token in re.split(r"[\s=']+", rest) if token]
    return _Masked("".join(out) + f"{' ' if out else ''}{MASK}", tuple(secrets))


def problem(dsn: str) -> str | None:
    """Why libpq refuses ``dsn`` (its own words, secrets scrubbed), or None when it parses."""
    import psycopg

    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        return redact(str(exc).strip(), dsn)
    return None


def connect_timeout(seconds: float) -> int:
    """libpq's ``connect_timeout`` for DATABASE_CONNECTION_TIMEOUT: whole seconds, and libpq takes 2 as
    its least (a smaller value is silently raised to 2)."""
    return max(2, math.ceil(seconds))
