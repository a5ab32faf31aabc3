-- 0007 event values (issue 12): every outbox row keeps the bucket values and the rule's description of
-- the change it publishes. The relay used to read them from the alert row at publication time, so a
-- resolved event repeated the values of the firing (or a created event still unsent at the resolution
-- showed the resolution's). The trigger copies them from the alert row as the change writes it; the
-- receiver's resolution writes the values at the resolution (exporter/receiver/store.py).

ALTER TABLE dict_rate_limit_alert_outbox
    ADD COLUMN available_tokens              bigint,
    ADD COLUMN capacity                      bigint,
    ADD COLUMN utilization_percent           double precision,
    ADD COLUMN recovery_eta_seconds          double precision,
    ADD COLUMN exhaustion_projection_seconds double precision,
    ADD COLUMN summary                       text,
    ADD COLUMN description                   text;

COMMENT ON COLUMN dict_rate_limit_alert_outbox.available_tokens IS
    'Bucket values (this and the next four columns) at the moment of this change, as the event carries them.';
COMMENT ON COLUMN dict_rate_limit_alert_outbox.description IS
    'The rule''s description (rendered by Prometheus) as the alert row held it at this change.';

-- Rows queued before this migration: the only values known are the alert row's.
UPDATE dict_rate_limit_alert_outbox o
   SET available_tokens = a.available_tokens, capacity = a.capacity,
       utilization_percent = a.utilization_percent, recovery_eta_seconds = a.recovery_eta_seconds,
       exhaustion_projection_seconds = a.exhaustion_projection_seconds,
       summary = a.summary, description = a.description
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
                    utilization_percent, recovery_eta_seconds, exhaustion_projection_seconds, summary, description)
        VALUES (dict_rate_limit_alert_event_id(NEW.fingerprint, NEW.starts_at, 'rate_limit.alert.created'),
                NEW.id, 'rate_limit.alert.created', NEW.available_tokens, NEW.capacity, NEW.utilization_percent,
                NEW.recovery_eta_seconds, NEW.exhaustion_projection_seconds, NEW.summary, NEW.description)
        ON CONFLICT DO NOTHING;
    END IF;
    IF NEW.status = 'resolved' AND (TG_OP = 'INSERT' OR OLD.status = 'firing') THEN
        INSERT INTO dict_rate_limit_alert_outbox (event_id, alert_id, event_type, available_tokens, capacity,
                    utilization_percent, recovery_eta_seconds, exhaustion_projection_seconds, summary, description)
        VALUES (dict_rate_limit_alert_event_id(NEW.fingerprint, NEW.starts_at, 'rate_limit.alert.resolved'),
                NEW.id, 'rate_limit.alert.resolved', NEW.available_tokens, NEW.capacity, NEW.utilization_percent,
                NEW.recovery_eta_seconds, NEW.exhaustion_projection_seconds, NEW.summary, NEW.description)
        ON CONFLICT DO NOTHING;
    END IF;
    -- No pg_notify here: a transaction that notifies takes a global lock through its commit, which would
    -- serialize the receivers' commits (and their fsyncs). The relay polls, and is woken in-process.
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION dict_rate_limit_alert_outbox_enqueue() IS
    'Queues rate_limit.alert.created on insert and rate_limit.alert.resolved on firing -> resolved, each with the row''s values of that change.';
