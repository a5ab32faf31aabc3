-- 0007 event values, down: the auto-resolve of 0002 and the trigger of 0003 again (events read their
-- values from the alert row).
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
           updated_at = now()
      FROM recovered
     WHERE a.id = recovered.id AND a.status = 'firing';
    GET DIAGNOSTICS resolved = ROW_COUNT;
    RETURN resolved;
END;
$$;

COMMENT ON FUNCTION auto_resolve_alerts(interval, text[]) IS
    'Resolves (resolved_by = auto_resolve) firing threshold alerts whose policy is back above the threshold for grace.';


DROP FUNCTION IF EXISTS dict_rate_limit_latest_values(text);

CREATE OR REPLACE FUNCTION dict_rate_limit_alert_outbox_enqueue()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- A first notification may already be resolved (the firing one was lost): both events, in order.
        INSERT INTO dict_rate_limit_alert_outbox (event_id, alert_id, event_type)
        VALUES (dict_rate_limit_alert_event_id(NEW.fingerprint, NEW.starts_at, 'rate_limit.alert.created'),
                NEW.id, 'rate_limit.alert.created')
        ON CONFLICT DO NOTHING;
    END IF;
    IF NEW.status = 'resolved' AND (TG_OP = 'INSERT' OR OLD.status = 'firing') THEN
        INSERT INTO dict_rate_limit_alert_outbox (event_id, alert_id, event_type)
        VALUES (dict_rate_limit_alert_event_id(NEW.fingerprint, NEW.starts_at, 'rate_limit.alert.resolved'),
                NEW.id, 'rate_limit.alert.resolved')
        ON CONFLICT DO NOTHING;
    END IF;
    -- No pg_notify here: a transaction that notifies takes a global lock through its commit, which would
    -- serialize the receivers' commits (and their fsyncs). The relay polls, and is woken in-process.
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION dict_rate_limit_alert_outbox_enqueue() IS
    'Queues rate_limit.alert.created on insert and rate_limit.alert.resolved on firing -> resolved.';

ALTER TABLE dict_rate_limit_alert_outbox
    DROP COLUMN available_tokens,
    DROP COLUMN capacity,
    DROP COLUMN utilization_percent,
    DROP COLUMN recovery_eta_seconds,
    DROP COLUMN exhaustion_projection_seconds;
