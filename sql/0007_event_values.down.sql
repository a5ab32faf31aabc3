-- 0007 event values, down: the trigger of 0003 again (events read their values from the alert row).
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
    DROP COLUMN exhaustion_projection_seconds,
    DROP COLUMN summary,
    DROP COLUMN description;
