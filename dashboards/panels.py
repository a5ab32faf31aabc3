"""The dashboard's panels, row by row: danger first, then buckets, alerts, monitoring health, history."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common, gauge, stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from panel_kit import (
    ANSWERS_IN_CATEGORY,
    CRIT,
    EXHAUSTION_SOON_SECONDS,
    ID,
    IN_CATEGORY,
    LOOKUP_404_SHARE_MAX,
    PG,
    PROM,
    RULE_SEL,
    SEL,
    SHARED_ID,
    SHARED_SEL,
    WARN,
    SqlQuery,
    bars,
    promql,
    remaining_steps,
    runbook,
    series_panel,
    steps,
    utilization_steps,
)

# --- row 1: what an on-call engineer needs first


def danger_table() -> table.Panel:
    # Recording rules fold exporter replicas (instance, pod) the way the alerts do.
    top = f"bottomk(10, endpoint:dict_rate_limit_remaining:ratio{{{RULE_SEL}}}{IN_CATEGORY})"
    join = f" and on (participant, endpoint_id) {top}"
    available = f"min without (instance, pod) (dict_rate_limit_available_tokens{{{SEL}}}){join}"
    eta = f"max without (instance, pod) (dict_rate_limit_recovery_eta_seconds{{{SEL}}}){join}"
    return (
        table.Panel()
        .title("Buckets in danger (lowest remaining first)")
        .description(
            "The ten buckets with the lowest share of tokens left. Red: at or below the default CRITICAL "
            f"threshold ({CRIT:.0%} remaining), orange: the default WARNING ({WARN:.0%}); the threshold "
            "columns show each policy's own (per-policy overrides)."
        )
        .datasource(PROM)
        .with_target(promql(top, ref_id="A", instant=True))
        .with_target(promql(available, ref_id="B", instant=True))
        .with_target(promql(eta, ref_id="C", instant=True))
        .with_target(
            promql(
                f"endpoint:dict_rate_limit_warning_remaining:ratio{{{ID}}}{join}", ref_id="D", instant=True
            )
        )
        .with_target(
            promql(
                f"endpoint:dict_rate_limit_critical_remaining:ratio{{{ID}}}{join}", ref_id="E", instant=True
            )
        )
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "__name__": True, "instance": True, "job": True},
                    "renameByName": {
                        "participant": "Participant",
                        "endpoint_id": "Policy",
                        "psp_category": "Category",
                        "Value #A": "Remaining",
                        "Value #B": "Available tokens",
                        "Value #C": "Full again in",
                        "Value #D": "WARNING at",
                        "Value #E": "CRITICAL at",
                    },
                },
            )
        )
        .sort_by([common.TableSortByFieldState().display_name("Remaining").desc(False)])
        .unit("percentunit")
        .thresholds(remaining_steps())
        .override_by_name(
            "Remaining",
            [
                dm.DynamicConfigValue("custom.cellOptions", {"type": "color-background", "mode": "basic"}),
                dm.DynamicConfigValue("unit", "percentunit"),
            ],
        )
        .override_by_name("Available tokens", [dm.DynamicConfigValue("unit", "short")])
        .override_by_name("Full again in", [dm.DynamicConfigValue("unit", "s")])
        .links([runbook("bucket below threshold", "dictratelimitcritical")])
    )


def firing_stat(alertname: str, title: str, color: str, anchor: str) -> stat.Panel:
    expr = f'count(ALERTS{{alertname="{alertname}", alertstate="firing", {SEL}}}) or vector(0)'
    return (
        stat.Panel()
        .title(title)
        .description(f"Buckets for which {alertname} fires now (0 when none).")
        .datasource(PROM)
        .with_target(promql(expr, legend=title))
        .unit("none")
        .thresholds(steps("green", (1, color)))
        .links([runbook(alertname, anchor)])
    )


# --- row 2: the seeds' bucket panels


def utilization_gauges() -> gauge.Panel:
    return (
        gauge.Panel()
        .title("Utilization per policy")
        .description("100 × (1 − available / capacity): WARNING from 80 %, CRITICAL from 90 % (defaults).")
        .datasource(PROM)
        .with_target(promql(f"max without (instance, pod) (dict_rate_limit_utilization_percent{{{SEL}}})"))
        .unit("percent")
        .min(0)
        .max(100)
        .thresholds(utilization_steps())
        .links([runbook("WARNING", "dictratelimitwarning"), runbook("CRITICAL", "dictratelimitcritical")])
    )


def bucket_panels() -> list[cogbuilder.Builder[dm.Panel]]:
    remaining = series_panel(
        "Remaining share of each bucket",
        "percentunit",
        "available / capacity; the dashed lines are the default WARNING and CRITICAL thresholds.",
        promql(f"endpoint:dict_rate_limit_remaining:ratio{{{RULE_SEL}}}{IN_CATEGORY}"),
    ).thresholds(remaining_steps())
    remaining = remaining.thresholds_style(
        common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
    ).links([runbook("bucket below threshold", "dictratelimitwarning")])
    return [
        series_panel(
            "Available tokens per policy",
            "short",
            "DICT AvailableTokens (cached from the last poll). May be negative: a 404 lookup costs 3 tokens.",
            promql(f"min without (instance, pod) (dict_rate_limit_available_tokens{{{SEL}}})"),
        ),
        utilization_gauges(),
        remaining,
        series_panel(
            "Consumption rate",
            "short",  # tokens per minute: Grafana has no such unit, so a plain number and an axis label
            "Gross tokens consumed per minute (refill counted), from the consumption counter over the "
            "dashboard's rate interval.",
            promql(
                "max without (instance, pod) "
                f"(rate(dict_rate_limit_consumed_tokens_total{{{SEL}}}[$__rate_interval])) * 60"
            ),
        ).axis_label("tokens/min"),
        bars(
            "Recovery ETA",
            "s",
            f"max without (instance, pod) (dict_rate_limit_recovery_eta_seconds{{{SEL}}})",
            "Time until the bucket is full again at its refill rate if nothing more is consumed.",
            steps("green", (900, "orange"), (1800, "red")),
        ),
        bars(
            "Exhaustion projection",
            "s",
            f"endpoint:dict_rate_limit_exhaustion:seconds{{{RULE_SEL}}}{IN_CATEGORY}",
            "Time until the balance reaches 0 at the last 5 minutes' net drain (the projection "
            "DICTRateLimitExhaustionSoon alerts on below one hour). Empty when no bucket is draining "
            "(consumption below refill): the healthy state.",
            steps("red", (EXHAUSTION_SOON_SECONDS, "green")),
        ).links([runbook("exhaustion soon", "dictratelimitexhaustionsoon")]),
    ]


# --- row 3: alerts


def alert_panels() -> list[cogbuilder.Builder[dm.Panel]]:
    active = (
        table.Panel()
        .title("Active alerts")
        .description("DICTRateLimit* alerts firing now in Prometheus. Empty in a healthy state.")
        .datasource(PROM)
        .with_target(
            promql(f'ALERTS{{alertname=~"DICTRateLimit.*", alertstate="firing", {SEL}}}', instant=True)
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "__name__": True, "Value": True}},
            )
        )
        .unit("none")
        .links([runbook("every alert", "")])
    )
    lifecycle = series_panel(
        "Alerts created / resolved",
        "short",
        "Alert lifecycle events recorded by the receiver (and published to Pulsar), per severity.",
        promql(
            "sum by (severity) "
            f"(increase(dict_rate_limit_alerts_created_total{{{SHARED_SEL}}}[$__rate_interval]))",
            legend="created {{severity}}",
        ),
        promql(
            "sum by (severity) "
            f"(increase(dict_rate_limit_alerts_resolved_total{{{SHARED_SEL}}}[$__rate_interval]))",
            legend="resolved {{severity}}",
            ref_id="B",
        ),
    )
    history = (
        table.Panel()
        .title("Alert history (PostgreSQL)")
        .description("Every alert the receiver recorded, newest first; kept indefinitely as the audit trail.")
        .datasource(PG)
        .with_target(SqlQuery(ALERT_HISTORY_SQL, fmt="table"))
        .unit("none")
        .override_by_name("utilization_percent", [dm.DynamicConfigValue("unit", "percent")])
        .override_by_name("resolved_at", [dm.DynamicConfigValue("unit", "dateTimeAsIso")])
    )
    return [active, lifecycle, history]


ALERT_HISTORY_SQL = """
SELECT starts_at AS "time", alert_name, severity, endpoint_id, psp_category, status, resolved_at, resolved_by,
       utilization_percent, summary
FROM dict_rate_limit_alerts
WHERE $__timeFilter(starts_at) AND (endpoint_id IS NULL OR endpoint_id IN ($policy))
ORDER BY starts_at DESC LIMIT 500
"""


# --- row 4: is the monitoring itself healthy?


def health_panels() -> list[cogbuilder.Builder[dm.Panel]]:
    bridge = (
        stat.Panel()
        .title("Bridge up")
        .description("1 when the exporter's last poll of the Bridge succeeded (per exporter replica).")
        .datasource(PROM)
        .with_target(promql(f"dict_rate_limit_bridge_up{{{ID}}}", legend="{{instance}} {{participant}}"))
        .unit("bool_yes_no")
        .thresholds(steps("red", (1, "green")))
        .links([runbook("Bridge down", "dictratelimitbridgedown")])
    )
    poll_age = (
        stat.Panel()
        .title("Age of the data")
        .description(
            "Seconds since the last successful poll. Bucket series are withdrawn after STALE_AFTER_INTERVALS "
            "intervals (90 s at the default 30 s interval)."
        )
        .datasource(PROM)
        .with_target(
            promql(
                f"time() - dict_rate_limit_last_success_timestamp_seconds{{{ID}}}",
                legend="{{instance}} {{participant}}",
            )
        )
        .unit("s")
        .thresholds(steps("green", (60, "orange"), (90, "red")))
        .links([runbook("stale data", "dictratelimitdatastale")])
    )
    return [
        bridge,
        poll_age,
        series_panel(
            "Poll duration (p95)",
            "s",
            "95th percentile of one poll's wall time, retries included.",
            promql(
                "histogram_quantile(0.95, sum by (le, instance, participant) "
                f"(rate(dict_rate_limit_poll_duration_seconds_bucket{{{ID}}}[$__rate_interval])))",
                legend="{{instance}} {{participant}}",
            ),
        ),
        series_panel(
            "History queue",
            "short",
            "Snapshots waiting for PostgreSQL, its capacity, and snapshots dropped because it was full.",
            promql(f"dict_rate_limit_history_queue_depth{{{SHARED_ID}}}", legend="queued {{instance}}"),
            promql(
                f"dict_rate_limit_history_queue_capacity{{{SHARED_ID}}}",
                legend="capacity {{instance}}",
                ref_id="B",
            ),
            promql(
                f"increase(dict_rate_limit_history_dropped_total{{{SHARED_ID}}}[$__rate_interval])",
                legend="dropped {{instance}}",
                ref_id="C",
            ),
        ).links([runbook("history dropping snapshots", "dictratelimithistorydropping")]),
        series_panel(
            "Pulsar backlog (outbox)",
            "short",
            "Alert events committed by the receiver but not yet acknowledged by Pulsar.",
            promql(f"dict_rate_limit_outbox_backlog{{{SHARED_ID}}}", legend="{{instance}}"),
        ).links([runbook("events not reaching Pulsar", "dictratelimitoutboxbacklog")]),
        series_panel(
            "Oldest unsent event",
            "s",
            "Age of the oldest alert event still waiting for Pulsar (0 when none).",
            promql(f"dict_rate_limit_outbox_oldest_age_seconds{{{SHARED_ID}}}", legend="{{instance}}"),
        ),
    ]


# --- row 5: history beyond Prometheus retention (PostgreSQL)

STATES_SQL = """
SELECT $__timeGroupAlias(response_time, $__interval), endpoint_id AS metric, {aggregate} AS value
FROM dict_rate_limit_states
WHERE $__timeFilter(response_time) AND endpoint_id IN ($policy) AND psp_category IN ($category)
GROUP BY 1, 2 ORDER BY 1
"""


def history_panels() -> list[cogbuilder.Builder[dm.Panel]]:
    def sql_series(title: str, unit: str, aggregate: str, description: str) -> timeseries.Panel:
        return (
            timeseries.Panel()
            .title(title)
            .description(description)
            .datasource(PG)
            .with_target(SqlQuery(STATES_SQL.format(aggregate=aggregate)))
            .unit(unit)
        )

    return [
        sql_series(
            "Lowest remaining share per interval (history)",
            "percentunit",
            "min(remaining_ratio)",
            "From dict_rate_limit_states (13 months kept): the worst point of each bucket in each interval.",
        ).thresholds(remaining_steps()),
        sql_series(
            "Tokens consumed per interval (history)",
            "short",
            "sum(consumed_tokens)",
            "Gross tokens consumed, summed per interval from the stored snapshots.",
        ),
    ]


# --- row 3: what DICT answered (the Bridge's counts of DICT's answers)


def answer_panels() -> list[cogbuilder.Builder[dm.Panel]]:
    share = series_panel(
        "404 share of key lookups (24 h)",
        "percentunit",
        "Share of the key lookups DICT answered over the last 24 hours that were 404 (key not found), per "
        "participant; the dashed line is DICTRateLimitLookupNotFoundShareHigh's threshold (DICT manual "
        f"§13.2, {LOOKUP_404_SHARE_MAX:.0%} by default; the alert also needs 100 lookups in the window).",
        promql(f"deployment:dict_rate_limit_dict_lookup_404:ratio24h{{{ID}}}", legend="24 h {{participant}}"),
    ).thresholds(steps("green", (LOOKUP_404_SHARE_MAX, "red")))
    share = share.thresholds_style(
        common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
    ).links([runbook("404 share of key lookups", "dictratelimitlookupnotfoundsharehigh")])
    refused = (
        series_panel(
            "429 answers received, by policy",
            "short",
            "Requests DICT refused with HTTP 429 per policy, per rate interval, as the Bridge counted them "
            "(a Bridge restart is a counter reset, not 429s). 429s on a policy whose bucket looks healthy "
            "come from the per-end-user antiscan buckets DICT's list does not show.",
            promql(
                "increase(endpoint:dict_rate_limit_dict_429_responses_total:max"
                f"{{{RULE_SEL}}}[$__rate_interval]){ANSWERS_IN_CATEGORY}"
            ),
        )
        .draw_style(cm.GraphDrawStyle.BARS)
        .axis_label("answers")
        .links([runbook("429 received", "dictratelimitrequestsrefused")])
    )
    return [share, refused]
