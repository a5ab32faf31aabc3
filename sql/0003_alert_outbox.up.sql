-- 0003 alert outbox: one row per alert state change, written in the same transaction as the change and
-- published to Pulsar by the receiver's relay (transactional outbox: a Pulsar outage loses nothing).
--
-- Rows come from a trigger on dict_rate_limit_alerts, so every writer produces its events the same way:
-- the receiver (Alertmanager notifications) and auto_resolve_alerts() (resolutions Alertmanager never
-- sent). The event body is rendered by the relay from the alert row (exporter/events.py), one formatter.

CREATE TABLE dict_rate_limit_alert_outbox (
    id          bigserial   PRIMARY KEY,      -- publication order (per policy: see docs/receiver.md)
    -- Chosen once, at insert: every retry publishes the same id, so consumers deduplicate on it.
    event_id    uuid        NOT NULL UNIQUE,
    alert_id    bigint      NOT NULL REFERENCES dict_rate_limit_alerts (id) ON DELETE CASCADE,
    event_type  text        NOT NULL CHECK (event_type IN ('rate_limit.alert.created', 'rate_limit.alert.resolved')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,                  -- set only after the broker acknowledged the message
    attempts    integer     NOT NULL DEFAULT 0,
    last_error  text,
    CONSTRAINT dict_rate_limit_alert_outbox_transition UNIQUE (alert_id, event_type)
);

COMMENT ON TABLE dict_rate_limit_alert_outbox IS
    'Alert events waiting for (sent_at IS NULL) or acknowledged by (sent_at set) Pulsar; kept as a publication log.';

-- What the relay scans: the unsent rows in id order (small: empty when Pulsar is healthy).
CREATE INDEX dict_rate_limit_alert_outbox_unsent ON dict_rate_limit_alert_outbox (id) WHERE sent_at IS NULL;

-- A deterministic event id: the same alert instance and transition always give the same UUID, whichever
-- replica or function recorded it (md5 of fingerprint, startsAt in microseconds and event type).
CREATE FUNCTION dict_rate_limit_alert_event_id(p_fingerprint text, p_starts_at timestamptz, p_event_type text)
RETURNS uuid
LANGUAGE sql IMMUTABLE
AS $$
    SELECT md5(p_fingerprint || '|' || (extract(epoch FROM p_starts_at) * 1000000)::bigint::text
               || '|' || p_event_type)::uuid
$$;

CREATE FUNCTION dict_rate_limit_alert_outbox_enqueue()
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

CREATE TRIGGER dict_rate_limit_alerts_outbox
    AFTER INSERT OR UPDATE OF status ON dict_rate_limit_alerts
    FOR EACH ROW EXECUTE FUNCTION dict_rate_limit_alert_outbox_enqueue();
