-- 0002 alerts: the alert lifecycle (filled by the receiver, kept indefinitely as the audit trail), the
-- auto-resolve safety net, the active-alerts view and the daily maintenance entry point.

CREATE TABLE dict_rate_limit_alerts (
    id                            bigserial        PRIMARY KEY,
    fingerprint                   text             NOT NULL,
    alert_name                    text             NOT NULL,
    severity                      text             NOT NULL CHECK (severity IN ('critical', 'warning', 'info')),
    endpoint_id                   text,            -- NULL for health alerts (exporter down, stale data...)
    psp_category                  text,
    status                        text             NOT NULL CHECK (status IN ('firing', 'resolved')),
    starts_at                     timestamptz      NOT NULL,
    ends_at                       timestamptz,
    resolved_at                   timestamptz,
    resolved_by                   text             CHECK (resolved_by IN ('alertmanager', 'auto_resolve')),
    available_tokens              bigint,
    capacity                      bigint,
    utilization_percent           double precision,
    recovery_eta_seconds          double precision,
    exhaustion_projection_seconds double precision,
    summary                       text,
    description                   text,
    labels                        jsonb            NOT NULL,
    annotations                   jsonb            NOT NULL,
    payload                       jsonb            NOT NULL,  -- the last alert object received
    generator_url                 text,
    created_at                    timestamptz      NOT NULL DEFAULT now(),
    updated_at                    timestamptz      NOT NULL DEFAULT now(),
    -- One alert instance = Alertmanager fingerprint + startsAt: re-notifications update, never duplicate.
    CONSTRAINT dict_rate_limit_alerts_instance UNIQUE (fingerprint, starts_at)
);

COMMENT ON TABLE dict_rate_limit_alerts IS
    'Alert lifecycle as Alertmanager notified it (plus auto-resolutions); kept indefinitely, never partitioned.';

CREATE INDEX dict_rate_limit_alerts_firing ON dict_rate_limit_alerts (endpoint_id) WHERE status = 'firing';
CREATE INDEX dict_rate_limit_alerts_endpoint_starts ON dict_rate_limit_alerts (endpoint_id, starts_at DESC);
CREATE INDEX dict_rate_limit_alerts_starts ON dict_rate_limit_alerts (starts_at DESC);

-- Safety net for a resolved notification that never arrived: resolves firing threshold alerts whose
-- policy's latest snapshot was taken after the alert started and whose every snapshot during the last
-- `grace` before it is above the alert's threshold (the policy's own percentages, default 20/10), so a
-- recovery that Alertmanager is about to report is not raced. Returns the number of alerts resolved.
CREATE FUNCTION auto_resolve_alerts(
    grace       interval DEFAULT interval '5 minutes',
    alert_names text[]   DEFAULT ARRAY['DICTRateLimitCritical', 'DICTRateLimitWarning'])
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    resolved integer;
BEGIN
    WITH latest AS (
        SELECT a.id,
               l.response_time,
               CASE a.severity
                   WHEN 'critical' THEN coalesce(p.critical_threshold_percent, 10)
                   ELSE coalesce(p.warning_threshold_percent, 20)
               END AS threshold_percent,
               a.endpoint_id
          FROM dict_rate_limit_alerts a
          CROSS JOIN LATERAL (
                SELECT st.response_time, st.psp_category
                  FROM dict_rate_limit_states st
                 WHERE st.endpoint_id = a.endpoint_id
                 ORDER BY st.response_time DESC
                 LIMIT 1) l
          LEFT JOIN dict_rate_limit_policies p
            ON p.endpoint_id = a.endpoint_id AND p.psp_category = l.psp_category
         WHERE a.status = 'firing'
           AND a.endpoint_id IS NOT NULL
           AND a.severity IN ('critical', 'warning')
           AND a.alert_name = ANY (alert_names)
           AND l.response_time > a.starts_at
    ), recovered AS (
        SELECT latest.id
          FROM latest
         WHERE NOT EXISTS (
                SELECT 1
                  FROM dict_rate_limit_states b
                 WHERE b.endpoint_id = latest.endpoint_id
                   AND b.response_time BETWEEN latest.response_time - grace AND latest.response_time
                   AND b.remaining_ratio * 100 <= latest.threshold_percent)
    )
    UPDATE dict_rate_limit_alerts a
       SET status = 'resolved',
           resolved_at = now(),
           resolved_by = 'auto_resolve',
           updated_at = now()
      FROM recovered
     WHERE a.id = recovered.id AND a.status = 'firing';
    GET DIAGNOSTICS resolved = ROW_COUNT;
    RETURN resolved;
END;
$$;

COMMENT ON FUNCTION auto_resolve_alerts(interval, text[]) IS
    'Resolves (resolved_by = auto_resolve) firing threshold alerts whose policy is back above the threshold for grace.';

CREATE VIEW v_dict_rate_limit_active_alerts AS
SELECT a.id,
       a.fingerprint,
       a.alert_name,
       a.severity,
       a.endpoint_id,
       a.psp_category,
       a.starts_at,
       now() - a.starts_at                          AS age,
       extract(epoch FROM now() - a.starts_at)::bigint AS age_seconds,
       a.available_tokens,
       a.capacity,
       a.utilization_percent,
       a.recovery_eta_seconds,
       a.exhaustion_projection_seconds,
       a.summary,
       a.description,
       a.labels,
       a.updated_at
  FROM dict_rate_limit_alerts a
 WHERE a.status = 'firing';

COMMENT ON VIEW v_dict_rate_limit_active_alerts IS 'Firing alerts with their age, oldest first when ordered by starts_at.';

-- The daily job (the exporter runs it at start-up and every MAINTENANCE_INTERVAL_SECONDS): partitions for
-- the retention window (reference month and retention_months - 1 before it) and the next 2 months, drop
-- of the expired ones, auto-resolve. Serialized by the partition lock, so replicas may all call it.
CREATE FUNCTION perform_dict_rate_limit_maintenance(
    retention_months integer     DEFAULT 13,
    reference        timestamptz DEFAULT now())
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    created  text[];
    dropped  text[];
    resolved integer;
BEGIN
    PERFORM pg_advisory_xact_lock(28554171245146484);
    created := ARRAY(SELECT ensure_dict_rate_limit_state_partitions(reference, greatest(retention_months - 1, 0), 2));
    dropped := ARRAY(SELECT drop_old_partitions(retention_months, reference));
    resolved := auto_resolve_alerts();
    RETURN jsonb_build_object(
        'reference', reference,
        'retention_months', retention_months,
        'created', to_jsonb(created),
        'dropped', to_jsonb(dropped),
        'auto_resolved', resolved);
END;
$$;

COMMENT ON FUNCTION perform_dict_rate_limit_maintenance(integer, timestamptz) IS
    'Creates the partitions of the retention window and the next 2 months, drops expired ones, auto-resolves; returns a JSON summary.';
