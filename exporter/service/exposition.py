"""Several participants in one exposition: each part's samples labelled, each family written once.

A multi-participant exporter renders every participant's series as a single-participant exporter does
(the same collectors, cached the same way), then adds ``participant="<name>"`` to each sample line here,
in one place, so the collectors stay unaware of participants. Concatenating the parts would repeat each
family's ``# HELP``/``# TYPE`` once per participant, which the text format forbids (Prometheus refuses
the scrape); :func:`merge` writes each family's header once, followed by the samples of every part.

A part is split into families once, when its text changes (:func:`split`); a scrape only joins bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

#: One part of an exposition split by family: name -> (header lines, sample lines), in text order.
Families = dict[bytes, tuple[bytes, bytes]]

_HELP = b"# HELP "


def label_pair(name: str, value: str) -> bytes:
    """``name="value"`` escaped as the text format wants (backslash, quote, newline)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{name}="{escaped}"'.encode()


def labelled(line: bytes, pair: bytes) -> bytes:
    """A sample line with ``pair`` as its first label (``a 1`` -> ``a{p="x"} 1``)."""
    brace, space = line.find(b"{"), line.find(b" ")
    if brace != -1 and (space == -1 or brace < space):  # a metric name holds neither "{" nor " "
        rest = line[brace + 1 :]
        return line[: brace + 1] + pair + (rest if rest.startswith(b"}") else b"," + rest)
    return line[:space] + b"{" + pair + b"}" + line[space:]


def split(text: bytes, pair: bytes | None = None) -> Families:
    """The families of a text exposition (``generate_latest`` output), samples labelled with ``pair``."""
    families: Families = {}
    name = b""
    header: list[bytes] = []
    samples: list[bytes] = []

    def close() -> None:
        if header or samples:
            families[name] = (b"".join(header), b"".join(samples))

    for line in text.splitlines(keepends=True):
        if line.startswith(_HELP):
            close()
            name, header, samples = line[len(_HELP) :].split(b" ", 1)[0], [line], []
        elif line.startswith(b"#"):
            header.append(line)
        elif line.strip():
            samples.append(labelled(line, pair) if pair is not None else line)
    close()
    return families


def merge(parts: Iterable[Families]) -> bytes:
    """One exposition of every part: each family's header once (the first part's), then the samples of
    every part holding it, families in the order they first appear."""
    order: dict[bytes, bytes] = {}
    samples: dict[bytes, list[bytes]] = {}
    for part in parts:
        for name, (header, lines) in part.items():
            if name not in order:
                order[name] = header
                samples[name] = []
            samples[name].append(lines)
    return b"".join(order[name] + b"".join(samples[name]) for name in order)
