"""Building blocks of the dashboard: datasources, thresholds, runbook links, query and panel helpers."""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from exporter.config import ThresholdKeys
from exporter.rules.render import DEFAULT_LOOKUP_404_SHARE_MAX

# Panel links point at the runbook anchors the alert rules' runbook_url use (same base).
RUNBOOKS = "https://github.com/dict-rate-limit-exporter/dict-rate-limit-exporter/blob/main/docs/runbooks.md"
# Variable names as grafana/dashboard-linter expects them with two datasource variables
# (<type>_datasource); docs/dashboards.md and dashboards/.lint say where the linter cannot be followed.
PROM = dm.DataSourceRef(type_val="prometheus", uid="${prometheus_datasource}")
PG = dm.DataSourceRef(type_val="grafana-postgresql-datasource", uid="${postgres_datasource}")
# The identifying labels every selector carries: the Prometheus job, and the deployment labels the alert
# rules group by (cluster, namespace; absent labels match the ".*" of "All").
SHARED_ID = 'job=~"$job", cluster=~"$cluster", namespace=~"$namespace"'
# Series of one participant (buckets, the Bridge polls, DICT's answers) carry `participant` in an exporter
# that serves several; a single-participant exporter has no such label, which the ".*" of "All" matches.
# The exporter's shared parts (history queue) and the receiver's series have no participant: SHARED_ID.
ID = SHARED_ID + ', participant=~"$participant"'
SEL = ID + ', endpoint_id=~"$policy", psp_category=~"$category"'
SHARED_SEL = SHARED_ID + ', endpoint_id=~"$policy", psp_category=~"$category"'
# The recording rules carry no psp_category (rules bundle 2: not part of an alert's identity): select
# them by policy and keep the policies of the chosen categories with a join on the raw series.
RULE_SEL = ID + ', endpoint_id=~"$policy"'
IN_CATEGORY = (
    " and on (participant, endpoint_id) group by (participant, endpoint_id)"
    f" (dict_rate_limit_capacity{{{SEL}}})"
)
# The same for the DICT-answer rules: the per-end-user policies have answers but no bucket series. The
# counter is only there for its labels; increase() keeps the linter's counter rule (and is as cheap).
ANSWERS_IN_CATEGORY = (
    " and on (participant, endpoint_id) group by (participant, endpoint_id)"
    f" (increase(dict_rate_limit_dict_responses_total{{{SEL}}}[$__rate_interval]))"
)
# One source for the alert thresholds: the exporter's defaults, which the rules compare against.
WARN = ThresholdKeys().warning_remaining_ratio
CRIT = ThresholdKeys().critical_remaining_ratio
EXHAUSTION_SOON_SECONDS = 3600.0  # DICTRateLimitExhaustionSoon: projection below one hour
# DICTRateLimitLookupNotFoundShareHigh's default (rules render --lookup-404-share-max): one source.
LOOKUP_404_SHARE_MAX = DEFAULT_LOOKUP_404_SHARE_MAX


@dataclass(frozen=True)
class _SqlQuery(cogvariants.Dataquery):
    """A PostgreSQL panel query; the SDK has no builder for the SQL datasources."""

    ref_id: str
    raw_sql: str
    fmt: str

    def to_json(self) -> dict[str, object]:
        return {
            "datasource": PG.to_json(),
            "editorMode": "code",
            "format": self.fmt,
            "rawQuery": True,
            "rawSql": self.raw_sql,
            "refId": self.ref_id,
        }


class SqlQuery(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, raw_sql: str, fmt: str = "time_series", ref_id: str = "A") -> None:
        self._query = _SqlQuery(ref_id, " ".join(raw_sql.split()), fmt)

    def build(self) -> cogvariants.Dataquery:
        return self._query


def promql(
    expr: str, legend: str = "{{endpoint_id}} {{participant}}", ref_id: str = "A", *, instant: bool = False
) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(PROM)
    if instant:
        query = query.instant().format(pm.PromQueryFormat.TABLE)
    return query


def steps(base: str, *points: tuple[float, str]) -> dashboard.ThresholdsConfig:
    """Threshold steps: ``base`` colour below the first point, each point's colour from its value up."""
    return (
        dashboard.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(None, base), *(dm.Threshold(value, color) for value, color in points)])
    )


def remaining_steps() -> dashboard.ThresholdsConfig:
    return steps("red", (CRIT, "orange"), (WARN, "green"))


def utilization_steps() -> dashboard.ThresholdsConfig:
    return steps("green", (round(100 * (1 - WARN), 6), "orange"), (round(100 * (1 - CRIT), 6), "red"))


def runbook(title: str, anchor: str) -> dashboard.DashboardLink:
    return dashboard.DashboardLink(f"Runbook: {title}").url(f"{RUNBOOKS}#{anchor}").target_blank(True)


def series_panel(title: str, unit: str, description: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(PROM)
    for query in queries:
        panel = panel.with_target(query)
    return panel.fill_opacity(10).span_nulls(False)


def bars(
    title: str, unit: str, expr: str, description: str, thresholds: dashboard.ThresholdsConfig
) -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(PROM)
        .with_target(promql(expr))
        .unit(unit)
        .min(0)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(thresholds)
    )
