-- 0007 event values (issue 12): every outbox row keeps the bucket values of the change it publishes. The relay used to read them from the alert row at publication time, so a
-- resolved event repeated the values of the firing (or a created event still unsent at the resolution
-- showed the resolution's). The trigger copies them from the alert row as the change writes it; the
-- receiver's resolution writes the values at the resolution (exporter/receiver/store.py).

ALTER TABLE dict_rate_limit_alert_outbox
    ADD COLUMN available_tokens              bigint,
    ADD COLUMN capacity                      bigint,
    ADD COLUMN utilization_percent           double precision,
    ADD COLUMN recovery_eta_seconds          double precision,
    ADD COLUMN exhaustion_projection_seconds double precision;

COMMENT ON COLUMN dict_rate_limit_alert_outbox.available_tokens IS
    'Bucket values (this and the next four columns) at the moment of this change, as the event carries them.';

-- Rows queued before this migration: the only values known are the alert row's.
UPDATE dict_rate_limit_alert_outbox o
   SET available_tokens = a.available_tokens, capacity = a.capacity,
       utilization_percent = a.utilization_percent, recovery_eta_seconds = a.recovery_eta_seconds,
       exhaustion_projection_seconds = a.exhaustion_projection_seconds
  FROM dict_rate_limit_alerts a
 WHERE a.id = o.alert_id;

CREATE OR REPLACE FUNCTION dict_rate_limit_alert_outbox_enqueue()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- A first notification may already be resolved (the firing one was lost): both events, in order,
        -- both with the values of that one notification (the only ones known).
        INSERT INTO dict_rate_limit_alert_outbox (event_id, alert_id, event_type, available_tokens, capacity,
                    utilization_percent, recovery_eta_seconds, exhaustion_projection_seconds)
        VALUES (dict_rate_limit_alert_event_id(NEW.fingerprint, NEW.starts_at, 'rate_limit.alert.created'),
                NEW.id, 'rate_limit.alert.created', NEW.available_tokens, NEW.capacity, NEW.utilization_percent,
                NEW.recovery_eta_seconds, NEW.exhaustion_projection_seconds)
        ON CONFLICT DO NOTHING;
    END IF;
    IF NEW.status = 'resolved' AND (TG_OP = 'INSERT' OR OLD.status = 'firing') THEN
        INSERT INTO dict_rate_limit_alert_outbox (event_id, alert_id, event_type, available_tokens, capacity,
                    utilization_percent, recovery_eta_seconds, exhaustion_projection_seconds)
        VALUES (dict_rate_limit_alert_event_id(NEW.fingerprint, NEW.starts_at, 'rate_limit.alert.resolved'),
                NEW.id, 'rate_limit.alert.resolved', NEW.available_tokens, NEW.capacity, NEW.utilization_percent,
                NEW.recovery_eta_seconds, NEW.exhaustion_projection_seconds)
        ON CONFLICT DO NOTHING;
    END IF;
    -- No pg_notify here: a transaction that notifies takes a global lock through its commit, which would
    -- serialize the receivers' commits (and their fsyncs). The relay polls, and is woken in-process.
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION dict_rate_limit_alert_outbox_enqueue() IS
    'Queues rate_limit.alert.created on insert and rate_limit.alert.resolved on firing -> resolved, each with the row''s values of that change.';

-- The bucket values of a policy "now": its latest plausible snapshot (0005's bound). A resolution writes
-- them on the alert row (receiver, reconciliation, auto-resolve), so its event carries the values of the
-- resolution, not those of the firing.
CREATE FUNCTION dict_rate_limit_latest_values(p_endpoint_id text)
RETURNS TABLE (available_tokens bigint, capacity bigint, utilization_percent double precision,
               recovery_eta_seconds double precision, exhaustion_projection_seconds double precision)
LANGUAGE sql STABLE
AS $$
    SELECT st.available_tokens, st.capacity, st.utilization_percent, st.recovery_eta_seconds,
           st.exhaustion_projection_seconds
      FROM dict_rate_limit_states st
     WHERE st.endpoint_id = p_endpoint_id
       AND st.response_time <= dict_rate_limit_plausible_until()
     ORDER BY st.response_time DESC
     LIMIT 1
$$;

COMMENT ON FUNCTION dict_rate_limit_latest_values(text) IS
    'Bucket values of the policy''s latest plausible snapshot (no row when none): what a resolution records.';

-- The safety net of 0002, unchanged but for the values of the resolution.
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

