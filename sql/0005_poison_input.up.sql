-- 0005 poison input: columns that hold every value the Bridge contract allows, snapshots the writer
-- could not store set aside with their reason, "latest" robust to a row dated in the far future, and
-- outbox events the broker refuses for good set aside (replayable) instead of blocking the relay.

-- The proto declares refill_period_sec int64: integer refused every value >= 2^31 and so the whole
-- snapshot. The latest-states view reads the column, so it is dropped and made again below.
DROP VIEW v_dict_rate_limit_latest_states;
ALTER TABLE dict_rate_limit_states ALTER COLUMN refill_period_sec TYPE bigint;
ALTER TABLE dict_rate_limit_policies ALTER COLUMN refill_period_sec TYPE bigint;

-- A snapshot PostgreSQL refused for a reason no retry can fix (a value it cannot store), kept for
-- inspection instead of blocking every later snapshot (docs/history.md, "Set-aside snapshots").
-- Text fields are stored escaped (a NUL cannot be stored at all), the snapshot as escaped JSON text.
CREATE TABLE dict_rate_limit_rejected_snapshots (
    id             bigserial   PRIMARY KEY,
    rejected_at    timestamptz NOT NULL DEFAULT now(),
    response_time  timestamptz,
    correlation_id text        NOT NULL,
    psp_category   text        NOT NULL,
    reason         text        NOT NULL,
    error          text        NOT NULL,
    snapshot       text        NOT NULL
);
CREATE INDEX dict_rate_limit_rejected_snapshots_rejected_at ON dict_rate_limit_rejected_snapshots (rejected_at);

COMMENT ON TABLE dict_rate_limit_rejected_snapshots IS
    'Snapshots the history writer could not store (reason, PostgreSQL''s error, the escaped snapshot); kept 30 days.';

-- The newest time "latest" believes: a row dated beyond it (DICT's clock far ahead, a forged answer) is
-- kept but never taken as a policy's latest state, so one bad row cannot freeze "latest" for good.
CREATE FUNCTION dict_rate_limit_plausible_until()
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$ SELECT now() + interval '1 day' $$;

COMMENT ON FUNCTION dict_rate_limit_plausible_until() IS
    'Upper bound of a plausible response_time (now + 1 day): later rows are ignored by latest-state lookups.';

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

-- State rows already stored with a time beyond it (stored before this guard) are moved out of the
-- history into the set-aside table, so no reader of "latest" (auto_resolve_alerts() included) sees them.
INSERT INTO dict_rate_limit_rejected_snapshots
       (rejected_at, response_time, correlation_id, psp_category, reason, error, snapshot)
SELECT now(), st.response_time, st.correlation_id, st.psp_category, 'implausible_time',
       'moved out of dict_rate_limit_states by migration 0005: response_time beyond now + 1 day',
       row_to_json(st)::text
  FROM dict_rate_limit_states st
 WHERE st.response_time > dict_rate_limit_plausible_until();
DELETE FROM dict_rate_limit_states WHERE response_time > dict_rate_limit_plausible_until();

-- A policy row stamped in the far future would refuse every later update (the writer only moves
-- last_seen_at forward): bring such rows back to the newest plausible snapshot now; the writer's upsert
-- also overwrites them from here on.
UPDATE dict_rate_limit_policies p
   SET last_seen_at = coalesce(
           (SELECT max(st.response_time) FROM dict_rate_limit_states st
             WHERE st.endpoint_id = p.endpoint_id AND st.response_time <= dict_rate_limit_plausible_until()),
           p.first_seen_at),
       updated_at = now()
 WHERE p.last_seen_at > dict_rate_limit_plausible_until();

-- Outbox events the broker refuses for a permanent reason (MessageTooBig...): set aside, counted and
-- alerted on, published again by `dict-rate-limit outbox replay`.
ALTER TABLE dict_rate_limit_alert_outbox
    ADD COLUMN set_aside_at     timestamptz,
    ADD COLUMN set_aside_reason text;
DROP INDEX dict_rate_limit_alert_outbox_unsent;
CREATE INDEX dict_rate_limit_alert_outbox_unsent ON dict_rate_limit_alert_outbox (id)
    WHERE sent_at IS NULL AND set_aside_at IS NULL;
CREATE INDEX dict_rate_limit_alert_outbox_set_aside ON dict_rate_limit_alert_outbox (id)
    WHERE sent_at IS NULL AND set_aside_at IS NOT NULL;
COMMENT ON COLUMN dict_rate_limit_alert_outbox.set_aside_at IS
    'Set when the broker refused the event for good; the relay skips it until `outbox replay` clears it.';
