-- 0009 record alerts (issue 18): a whole notification recorded in one statement, one round trip.
--
-- The receiver used to record a notification alert by alert from Python: a lock statement per
-- fingerprint, then a look-up and an INSERT or UPDATE per alert, each its own round trip, inside
-- BEGIN ... COMMIT. This function does the same steps in the same order on the server, so a
-- notification is one autocommitted call. The lifecycle is unchanged (exporter/receiver/store.py):
--
-- * the transaction-level advisory lock of every fingerprint first, in the order the caller gives
--   (sorted by code point: receivers of older releases, still running during an upgrade, take them in
--   that order too, so the two never deadlock);
-- * then, alert by alert in the notification's order (a later copy of the same alert sees what an
--   earlier one wrote), the alert's episode: same fingerprint, starts_at within p_tolerance of the
--   notification's startsAt, not ended before it (Prometheus HA replicas start one alert up to an
--   evaluation apart, issue 11) -- no row keyed by the exact (fingerprint, startsAt) alone;
-- * firing + none: insert; resolved + none: insert resolved; resolved + firing row: resolve it with the
--   values of the resolution; anything else: a duplicate. The outbox trigger of 0003/0007 queues events.
--
-- p_alerts is a JSON array, one object per alert (built by store.py, serialised once per notification):
--   fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at, ends_at and
--   resolved_by (resolved alerts only), available_tokens, capacity, utilization_percent,
--   recovery_eta_seconds, exhaustion_projection_seconds (numeric annotations, or null), generator_url,
--   labels (only when they differ from the payload's: replica labels dropped), payload (the alert object
--   as Alertmanager sent it; annotations, summary and description are read from it).
-- Returns one outcome per alert, in order: created, created_resolved, resolved or duplicate.
CREATE FUNCTION dict_rate_limit_record_alerts(
    p_locks     text[],
    p_alerts    jsonb,
    p_tolerance interval,
    p_source    text)
RETURNS text[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_lock        text;
    v_alert       jsonb;
    v_payload     jsonb;
    v_annotations jsonb;
    v_fingerprint text;
    v_starts      timestamptz;
    v_resolved    boolean;
    v_found_id    bigint;
    v_found_state text;
    v_id          bigint;
    v_outcomes    text[] := ARRAY[]::text[];
BEGIN
    FOREACH v_lock IN ARRAY p_locks LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(v_lock, 28554171));
    END LOOP;
    -- The common notification (and an incident storm's): every alert firing, each alert once. Firing
    -- alerts only insert, and no alert can see another's row, so one look-up and one INSERT for all give
    -- what the loop below gives; rows (and their outbox rows, by the trigger) in the notification's order.
    IF (SELECT bool_and(e ->> 'status' = 'firing') AND count(DISTINCT e ->> 'fingerprint') = count(*)
          FROM jsonb_array_elements(p_alerts) e) THEN
        WITH input AS (
            SELECT e.ord, e.alert, e.alert -> 'payload' AS payload,
                   CASE WHEN jsonb_typeof(e.alert -> 'payload' -> 'annotations') = 'object'
                        THEN e.alert -> 'payload' -> 'annotations' ELSE '{}'::jsonb END AS annotations,
                   e.alert ->> 'fingerprint' AS fingerprint, (e.alert ->> 'starts_at')::timestamptz AS starts
              FROM jsonb_array_elements(p_alerts) WITH ORDINALITY AS e (alert, ord)
        ), fresh AS (
            -- LATERAL ... LIMIT 1, not NOT EXISTS: the planner made the latter a hash anti-join over a
            -- sequential scan of every alert ever recorded; this is an index probe per alert.
            SELECT i.*
              FROM input i
              LEFT JOIN LATERAL (
                    SELECT true AS known
                      FROM dict_rate_limit_alerts a
                     WHERE a.fingerprint = i.fingerprint
                       AND (a.fingerprint, a.starts_at) >= (i.fingerprint, i.starts - p_tolerance)
                       AND (a.fingerprint, a.starts_at) <= (i.fingerprint, i.starts + p_tolerance)
                       AND (a.status = 'firing' OR a.ends_at IS NULL OR i.starts < a.ends_at)
                     LIMIT 1) episode ON true
             WHERE episode.known IS NULL
        ), inserted AS (
            INSERT INTO dict_rate_limit_alerts (
                fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at,
                available_tokens, capacity, utilization_percent, recovery_eta_seconds,
                exhaustion_projection_seconds, summary, description, labels, annotations, payload,
                generator_url, alertmanager_url)
            SELECT f.fingerprint, f.alert ->> 'alert_name', f.alert ->> 'severity', f.alert ->> 'endpoint_id',
                   f.alert ->> 'psp_category', 'firing', f.starts,
                   coalesce((f.alert ->> 'available_tokens')::bigint, s.available_tokens),
                   coalesce((f.alert ->> 'capacity')::bigint, s.capacity),
                   coalesce((f.alert ->> 'utilization_percent')::float8, s.utilization_percent),
                   coalesce((f.alert ->> 'recovery_eta_seconds')::float8, s.recovery_eta_seconds),
                   coalesce((f.alert ->> 'exhaustion_projection_seconds')::float8,
                            s.exhaustion_projection_seconds),
                   f.annotations ->> 'summary', f.annotations ->> 'description',
                   coalesce(f.alert -> 'labels', f.payload -> 'labels'), f.annotations, f.payload,
                   f.alert ->> 'generator_url', nullif(p_source, '')
              FROM fresh f
              LEFT JOIN LATERAL (
                    SELECT st.available_tokens, st.capacity, st.utilization_percent, st.recovery_eta_seconds,
                           st.exhaustion_projection_seconds
                      FROM dict_rate_limit_states st
                     WHERE st.endpoint_id = f.alert ->> 'endpoint_id'
                       AND st.participant = coalesce(
                               coalesce(f.alert -> 'labels', f.payload -> 'labels') ->> 'participant', '')
                       AND st.response_time <= now() + interval '1 day'
                     ORDER BY st.response_time DESC
                     LIMIT 1) s ON true
             ORDER BY f.ord
            ON CONFLICT (fingerprint, starts_at) DO NOTHING
            RETURNING fingerprint
        )
        SELECT array_agg(CASE WHEN n.fingerprint IS NULL THEN 'duplicate' ELSE 'created' END ORDER BY i.ord)
          INTO v_outcomes
          FROM input i
          LEFT JOIN inserted n ON n.fingerprint = i.fingerprint;
        RETURN v_outcomes;
    END IF;
    FOR v_index IN 0 .. jsonb_array_length(p_alerts) - 1 LOOP
        v_alert := p_alerts -> v_index;
        v_payload := v_alert -> 'payload';
        v_annotations := CASE WHEN jsonb_typeof(v_payload -> 'annotations') = 'object'
                              THEN v_payload -> 'annotations' ELSE '{}'::jsonb END;
        v_fingerprint := v_alert ->> 'fingerprint';
        v_starts := (v_alert ->> 'starts_at')::timestamptz;
        v_resolved := v_alert ->> 'status' = 'resolved';

        SELECT a.id, a.status INTO v_found_id, v_found_state
          FROM dict_rate_limit_alerts a
         WHERE a.fingerprint = v_fingerprint
           -- starts_at within the tolerance, written as a range of the (fingerprint, starts_at) index:
           -- with the plain BETWEEN the planner took the starts_at index and filtered every alert that
           -- started at the same moment (an incident storm, a fresh table), per alert.
           AND (a.fingerprint, a.starts_at) >= (v_fingerprint, v_starts - p_tolerance)
           AND (a.fingerprint, a.starts_at) <= (v_fingerprint, v_starts + p_tolerance)
           AND (a.status = 'firing' OR a.ends_at IS NULL OR v_starts < a.ends_at)
         ORDER BY abs(extract(epoch FROM a.starts_at - v_starts))
         LIMIT 1;

        IF FOUND THEN
            v_id := NULL;
            IF v_resolved AND v_found_state = 'firing' THEN
                -- A resolution records the bucket values of its own moment (sql/0007).
                UPDATE dict_rate_limit_alerts a
                   SET status = 'resolved', ends_at = (v_alert ->> 'ends_at')::timestamptz,
                       resolved_at = now(), resolved_by = v_alert ->> 'resolved_by',
                       payload = v_payload, updated_at = now(),
                       (available_tokens, capacity, utilization_percent, recovery_eta_seconds,
                        exhaustion_projection_seconds) =
                       (SELECT coalesce((v_alert ->> 'available_tokens')::bigint, v.available_tokens),
                               coalesce((v_alert ->> 'capacity')::bigint, v.capacity),
                               coalesce((v_alert ->> 'utilization_percent')::float8, v.utilization_percent),
                               coalesce((v_alert ->> 'recovery_eta_seconds')::float8, v.recovery_eta_seconds),
                               coalesce((v_alert ->> 'exhaustion_projection_seconds')::float8,
                                        v.exhaustion_projection_seconds)
                          FROM (SELECT 1) AS one
                          LEFT JOIN LATERAL dict_rate_limit_latest_values(
                               a.endpoint_id, coalesce(a.labels ->> 'participant', '')) v ON true)
                 WHERE a.id = v_found_id AND a.status = 'firing'
                RETURNING a.id INTO v_id;
            END IF;
            v_outcomes := v_outcomes || CASE WHEN v_id IS NULL THEN 'duplicate' ELSE 'resolved' END;
            CONTINUE;
        END IF;

        v_id := NULL;
        INSERT INTO dict_rate_limit_alerts (
            fingerprint, alert_name, severity, endpoint_id, psp_category, status, starts_at, ends_at,
            resolved_at, resolved_by, available_tokens, capacity, utilization_percent, recovery_eta_seconds,
            exhaustion_projection_seconds, summary, description, labels, annotations, payload, generator_url,
            alertmanager_url)
        SELECT v_fingerprint, v_alert ->> 'alert_name', v_alert ->> 'severity', v_alert ->> 'endpoint_id',
               v_alert ->> 'psp_category', v_alert ->> 'status', v_starts,
               CASE WHEN v_resolved THEN (v_alert ->> 'ends_at')::timestamptz END,
               CASE WHEN v_resolved THEN now() END,
               CASE WHEN v_resolved THEN v_alert ->> 'resolved_by' END,
               coalesce((v_alert ->> 'available_tokens')::bigint, s.available_tokens),
               coalesce((v_alert ->> 'capacity')::bigint, s.capacity),
               coalesce((v_alert ->> 'utilization_percent')::float8, s.utilization_percent),
               coalesce((v_alert ->> 'recovery_eta_seconds')::float8, s.recovery_eta_seconds),
               coalesce((v_alert ->> 'exhaustion_projection_seconds')::float8, s.exhaustion_projection_seconds),
               v_annotations ->> 'summary', v_annotations ->> 'description',
               coalesce(v_alert -> 'labels', v_payload -> 'labels'), v_annotations, v_payload,
               v_alert ->> 'generator_url', nullif(p_source, '')
          FROM (SELECT 1) AS one
          LEFT JOIN LATERAL (
                SELECT st.available_tokens, st.capacity, st.utilization_percent, st.recovery_eta_seconds,
                       st.exhaustion_projection_seconds
                  FROM dict_rate_limit_states st
                 WHERE st.endpoint_id = v_alert ->> 'endpoint_id'
                   -- The alert's own participant (its label; none: the single participant's rows, 0008).
                   AND st.participant = coalesce(
                           coalesce(v_alert -> 'labels', v_payload -> 'labels') ->> 'participant', '')
                   AND st.response_time <= now() + interval '1 day'  -- a row dated 9999 is never "latest"
                 ORDER BY st.response_time DESC
                 LIMIT 1) s ON true
        ON CONFLICT (fingerprint, starts_at) DO NOTHING
        RETURNING id INTO v_id;
        v_outcomes := v_outcomes || CASE
            WHEN v_id IS NULL THEN 'duplicate'  -- the same instance exactly (fingerprint, startsAt): a retry
            WHEN v_resolved THEN 'created_resolved'
            ELSE 'created' END;
    END LOOP;
    RETURN v_outcomes;
END;
$$;

COMMENT ON FUNCTION dict_rate_limit_record_alerts(text[], jsonb, interval, text) IS
    'Records one webhook notification (alert rows; the trigger queues the outbox rows): one outcome per alert.';

-- The outbox rows of inserted alerts, one statement per INSERT instead of a PL/pgSQL call and an INSERT
-- per row: the same rows (created, then resolved for an alert first seen resolved; the values of the
-- inserted row; ON CONFLICT DO NOTHING) in the same order (alert by alert in id order, created before
-- resolved), as the row trigger of 0003/0007 gave. Updates (firing -> resolved: the receiver, the
-- reconciliation, auto_resolve_alerts()) keep the row trigger.
CREATE FUNCTION dict_rate_limit_alert_outbox_enqueue_inserted()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO dict_rate_limit_alert_outbox (event_id, alert_id, event_type, available_tokens, capacity,
                utilization_percent, recovery_eta_seconds, exhaustion_projection_seconds)
    SELECT dict_rate_limit_alert_event_id(n.fingerprint, n.starts_at, e.event_type), n.id, e.event_type,
           n.available_tokens, n.capacity, n.utilization_percent, n.recovery_eta_seconds,
           n.exhaustion_projection_seconds
      FROM inserted_alerts n
      CROSS JOIN LATERAL (VALUES (1, 'rate_limit.alert.created'), (2, 'rate_limit.alert.resolved'))
            AS e (step, event_type)
     WHERE e.step = 1 OR n.status = 'resolved'
     ORDER BY n.id, e.step
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION dict_rate_limit_alert_outbox_enqueue_inserted() IS
    'Queues rate_limit.alert.created (and .resolved for an alert inserted resolved) for the rows of one INSERT.';

DROP TRIGGER dict_rate_limit_alerts_outbox ON dict_rate_limit_alerts;
CREATE TRIGGER dict_rate_limit_alerts_outbox
    AFTER UPDATE OF status ON dict_rate_limit_alerts
    FOR EACH ROW EXECUTE FUNCTION dict_rate_limit_alert_outbox_enqueue();
CREATE TRIGGER dict_rate_limit_alerts_outbox_inserted
    AFTER INSERT ON dict_rate_limit_alerts
    REFERENCING NEW TABLE AS inserted_alerts
    FOR EACH STATEMENT EXECUTE FUNCTION dict_rate_limit_alert_outbox_enqueue_inserted();
