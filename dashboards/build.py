"""Generates dashboards/dict-rate-limit.json from code (grafana-foundation-sdk); `--check` fails on drift.

Run from the repository root: `python dashboards/build.py` (write) or `python dashboards/build.py --check`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from panel_kit import ID, PG, PROM, RUNBOOKS
from panels import (
    alert_panels,
    answer_panels,
    bucket_panels,
    danger_table,
    firing_stat,
    health_panels,
    history_panels,
)

OUTPUT = Path(__file__).resolve().parent / "dict-rate-limit.json"
#: The copy the Kubernetes base turns into the Grafana sidecar's ConfigMap (kustomize reads only files
#: inside its directory); written together with OUTPUT.
KUBERNETES_COPY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "base" / OUTPUT.name
UID = "dict-rate-limit"

# --- assembly


def variables() -> list[cogbuilder.Builder[dm.VariableModel]]:
    def label_values(
        name: str, label: str, query: str, all_value: str | None = None
    ) -> dashboard.QueryVariable:
        variable = (
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(PROM)
            .query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        )
        # Without an allValue, All expands to the listed values (the SQL panels' IN lists need that).
        return variable.all_value(all_value) if all_value else variable

    return [
        # The Prometheus variable first: the linter's Prometheus rules look at the first datasource variable.
        dashboard.DatasourceVariable("prometheus_datasource")
        .label("Prometheus data source")
        .type("prometheus"),
        dashboard.DatasourceVariable("postgres_datasource")
        .label("PostgreSQL data source")
        .type(PG.type_val or ""),
        # job: every job that serves the product (its build-info series, whatever the job is named: the
        # seeds' `dict-rate-limit`, a kustomize prefix...); ".+" for All, as the linter asks (every series
        # has a job). cluster and namespace: ".*", so All also matches a Prometheus that adds neither label.
        label_values(
            "job",
            "Job",
            'label_values({__name__=~"dict_rate_limit_(exporter|receiver)_build_info"}, job)',
            all_value=".+",
        ),
        label_values("cluster", "Cluster", 'label_values(up{job=~"$job"}, cluster)', all_value=".*"),
        label_values(
            "namespace",
            "Namespace",
            'label_values(up{job=~"$job", cluster=~"$cluster"}, namespace)',
            all_value=".*",
        ),
        # participant: in an exporter serving several participants; ".*" for All matches a single-participant
        # exporter, whose series have no participant label (the list is then empty, All still works).
        label_values(
            "participant",
            "Participant",
            'label_values(dict_rate_limit_available_tokens{job=~"$job", cluster=~"$cluster",'
            ' namespace=~"$namespace"}, participant)',
            all_value=".*",
        ),
        label_values(
            "category",
            "Category",
            f"label_values(dict_rate_limit_psp_category_info{{{ID}}}, psp_category)",
        ),
        label_values(
            "policy",
            "Policy",
            f'label_values(dict_rate_limit_capacity{{{ID}, psp_category=~"$category"}}, endpoint_id)',
        ),
    ]


Row = tuple[str, list[tuple[cogbuilder.Builder[dm.Panel], int, int]]]


def layout() -> list[Row]:
    """Rows of (panel, width, height); the grid has 24 columns."""
    danger = [
        danger_table(),
        firing_stat("DICTRateLimitCritical", "CRITICAL firing", "red", "dictratelimitcritical"),
        firing_stat("DICTRateLimitWarning", "WARNING firing", "orange", "dictratelimitwarning"),
    ]
    rows = [
        ("Buckets in danger", danger, "14x9 5x9 5x9"),
        ("Buckets", bucket_panels(), "12x8 12x8 12x8 12x8 12x9 12x9"),
        ("What DICT answered", answer_panels(), "12x8 12x8"),
        ("Alerts", alert_panels(), "12x8 12x8 24x9"),
        ("Monitoring health", health_panels(), "4x6 4x6 16x6 8x7 8x7 8x7"),
        ("History beyond Prometheus retention (PostgreSQL)", history_panels(), "12x8 12x8"),
    ]
    laid_out: list[Row] = []
    for title, panels, sizes in rows:
        dims = [tuple(int(n) for n in size.split("x")) for size in sizes.split()]
        laid_out.append((title, [(panel, w, h) for panel, (w, h) in zip(panels, dims, strict=True)]))
    return laid_out


def build() -> dict[str, object]:
    board = (
        dashboard.Dashboard("DICT rate limits")
        .uid(UID)
        .description(
            "DICT (Pix) rate-limit token buckets: danger first, then buckets, alerts, health, history."
        )
        .tags(["dict", "pix", "rate-limit"])
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("utc")
        # Provisioned from a file or the sidecar ConfigMap: edits in the UI would be lost on the next load.
        .readonly()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .variables(variables())
        .link(
            dashboard.DashboardLink("Runbooks")
            .url(RUNBOOKS)
            .target_blank(True)
            .type(dm.DashboardLinkType.LINK)
        )
    )
    panel_id = 1
    for title, panels in layout():
        board = board.with_row(dashboard.Row(title).id(panel_id))
        panel_id += 1
        for panel, width, height in panels:
            board = board.with_panel(_sized(panel, panel_id, width, height))
            panel_id += 1
    model: dict[str, object] = board.build().to_json()
    return model


def _sized(
    panel: cogbuilder.Builder[dm.Panel], panel_id: int, width: int, height: int
) -> cogbuilder.Builder[dm.Panel]:
    built = panel.build()
    built.id_val = panel_id
    built.grid_pos = dm.GridPos(h=height, w=width)
    return _Built(built)


class _Built(cogbuilder.Builder[dm.Panel]):
    def __init__(self, panel: dm.Panel) -> None:
        self._panel = panel

    def build(self) -> dm.Panel:
        return self._panel


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed JSON differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = [path for path in (OUTPUT, KUBERNETES_COPY) if path.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path} is out of date: run python dashboards/build.py", file=sys.stderr)
        return 1 if stale else 0
    for path in (OUTPUT, KUBERNETES_COPY):
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
