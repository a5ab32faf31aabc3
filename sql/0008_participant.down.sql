-- 0008 participant, down: the schema of 0007 again. Rows of named participants (a multi-participant
-- exporter's) cannot be told apart under 0007's keys: they are deleted; the single participant's stay.

CREATE OR REPLACE FUNCTION auto_resolve_alerts(
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
           updated_at = now(),
           (available_tokens, capacity, utilization_percent, recovery_eta_seconds,
            exhaustion_projection_seconds) =
               (SELECT v.available_tokens, v.capacity, v.utilization_percent, v.recovery_eta_seconds,
                       v.exhaustion_projection_seconds
                  FROM dict_rate_limit_latest_values(a.endpoint_id) v)
      FROM recovered
     WHERE a.id = recovered.id AND a.status = 'firing';
    GET DIAGNOSTICS resolved = ROW_COUNT;
    RETURN resolved;
END;
$$;

COMMENT ON FUNCTION auto_resolve_alerts(interval, text[]) IS
    'Resolves (resolved_by = auto_resolve) firing threshold alerts whose policy is back above the threshold for grace.';

DROP FUNCTION dict_rate_limit_latest_values(text, text);
DROP VIEW v_dict_rate_limit_latest_states;

DELETE FROM dict_rate_limit_states WHERE participant <> '';
ALTER TABLE dict_rate_limit_states DROP CONSTRAINT dict_rate_limit_states_pkey;
ALTER TABLE dict_rate_limit_states ADD PRIMARY KEY (endpoint_id, response_time);
ALTER TABLE dict_rate_limit_states DROP COLUMN participant;

DELETE FROM dict_rate_limit_policies WHERE participant <> '';
ALTER TABLE dict_rate_limit_policies DROP CONSTRAINT dict_rate_limit_policies_pkey;
ALTER TABLE dict_rate_limit_policies ADD PRIMARY KEY (endpoint_id, psp_category);
ALTER TABLE dict_rate_limit_policies DROP COLUMN participant;

CREATE VIEW v_dict_rate_limit_latest_states AS
SELECT s.endpoint_id,
       s.psp_category,
       s.available_tokens,
       s.capacity,
       s.refill_tokens,
       s.refill_period_sec,
       s.utilization_percent,
       s.remaining_ratio,
       s.consumption_rate_per_minute,
       s.consumed_tokens,
       s.recovery_eta_seconds,
       s.exhaustion_projection_seconds,
       s.error_404_rate,
       coalesce(p.warning_threshold_percent, 20)  AS warning_threshold_percent,
       coalesce(p.critical_threshold_percent, 10) AS critical_threshold_percent,
       dict_rate_limit_status(s.remaining_ratio, p.warning_threshold_percent, p.critical_threshold_percent)
           AS status,
       s.response_time,
       s.correlation_id,
       s.created_at
  FROM (SELECT DISTINCT endpoint_id FROM dict_rate_limit_policies) e
  CROSS JOIN LATERAL (
        SELECT *
          FROM dict_rate_limit_states st
         WHERE st.endpoint_id = e.endpoint_id
           AND st.response_time <= dict_rate_limit_plausible_until()
         ORDER BY st.response_time DESC
         LIMIT 1) s
  LEFT JOIN dict_rate_limit_policies p
    ON p.endpoint_id = s.endpoint_id AND p.psp_category = s.psp_category;

COMMENT ON VIEW v_dict_rate_limit_latest_states IS
    'Latest plausible snapshot of every policy (response_time <= now + 1 day) with utilization and OK/WARNING/CRITICAL.';
