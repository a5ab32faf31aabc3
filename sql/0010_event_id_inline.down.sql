-- 0010 event id inlined, down: the body of 0003 (same ids, not inlined).
CREATE OR REPLACE FUNCTION dict_rate_limit_alert_event_id(p_fingerprint text, p_starts_at timestamptz, p_event_type text)
RETURNS uuid
LANGUAGE sql IMMUTABLE
AS $$
    SELECT md5(p_fingerprint || '|' || (extract(epoch FROM p_starts_at) * 1000000)::bigint::text
               || '|' || p_event_type)::uuid
$$;
