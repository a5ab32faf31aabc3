"""Renders ``alertmanager/alertmanager.yml`` for a given receiver URL and token file (demo, tests, deploys).

The file in the repository is the reference configuration with placeholder addresses; this writes a copy
with the webhook URL and ``credentials_file`` substituted, the template paths made absolute (the copy
usually lives elsewhere), and, with ``fast=True``, one-second grouping so a demo or a test sees
notifications within seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ALERTMANAGER_DIR = Path(__file__).resolve().parent.parent / "alertmanager"
SOURCE = ALERTMANAGER_DIR / "alertmanager.yml"
WEBHOOK_RECEIVER = "dict-rate-limit-receiver"
#: Fast mode: notify within about a second of a change, and do not repeat during a test or a demo.
FAST_TIMINGS = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "24h"}


def _fast(route: dict[str, Any]) -> None:
    for key in ("group_wait", "group_interval", "repeat_interval"):
        if key in route or route.get("receiver") is not None:
            route[key] = FAST_TIMINGS[key]
    for child in route.get("routes", []):
        _fast(child)


def load_reference(source: Path = SOURCE) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    return loaded


def render_alertmanager_config(
    webhook_url: str,
    credentials_file: str | Path,
    out_path: str | Path,
    fast: bool = False,
    *,
    source: Path = SOURCE,
) -> Path:
    """Writes the configuration to ``out_path`` and returns it.

    ``credentials_file`` holds the receiver's bearer token (the same value as its
    WEBHOOK_BEARER_TOKEN_FILE); Alertmanager re-reads it on every notification.
    """
    config = load_reference(source)
    receivers = [r for r in config["receivers"] if r["name"] == WEBHOOK_RECEIVER]
    if len(receivers) != 1:
        raise ValueError(f"{source} must define exactly one receiver named {WEBHOOK_RECEIVER}")
    for webhook in receivers[0]["webhook_configs"]:
        webhook["url"] = webhook_url
        webhook["http_config"]["authorization"]["credentials_file"] = str(Path(credentials_file).absolute())
    config["templates"] = [
        str((source.parent / pattern).absolute()) for pattern in config.get("templates", [])
    ]
    if fast:
        _fast(config["route"])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Rendered from {source} by devstack.alertmanager_config; edit the source, not this copy.\n"
    out.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out
