-- 0010 event id inlined (issue 18): the same ids, computed in the query that needs them.
--
-- dict_rate_limit_alert_event_id() (0003) is declared IMMUTABLE, but its body called
-- extract(epoch FROM timestamptz), which PostgreSQL classes STABLE: the planner does not inline an
-- IMMUTABLE SQL function whose body is not, so every statement that queued outbox rows ran the
-- function through the SQL-function executor (set up once per statement, then called per row): about
-- a tenth of PostgreSQL's CPU per recorded alert. The epoch is now taken from the difference to the
-- Unix epoch, an interval (timestamptz - timestamptz and extract(epoch FROM interval) are IMMUTABLE),
-- so the body is inlined. Same value: microseconds since 1970-01-01 00:00 UTC, independent of TimeZone
-- (tests/receiver/test_events.py compares both bodies over 200,000 instants and three time zones).
CREATE OR REPLACE FUNCTION dict_rate_limit_alert_event_id(p_fingerprint text, p_starts_at timestamptz, p_event_type text)
RETURNS uuid
LANGUAGE sql IMMUTABLE
AS $$
    SELECT md5(p_fingerprint || '|'
               || (extract(epoch FROM p_starts_at - timestamptz '1970-01-01 00:00:00+00') * 1000000)::bigint::text
               || '|' || p_event_type)::uuid
$$;
