-- 0001 history: policies, monthly-partitioned bucket states, partition functions, latest-states view.
--
-- Time is UTC everywhere: partition bounds are UTC month starts whatever the session's TimeZone.
-- Retention drops whole partitions (drop_old_partitions), never rows.

CREATE TABLE dict_rate_limit_policies (
    endpoint_id                text             NOT NULL,
    psp_category               char(1)          NOT NULL,
    capacity                   bigint           NOT NULL,
    refill_tokens              bigint           NOT NULL,
    refill_period_sec          integer          NOT NULL,
    -- Remaining-token percentages: WARNING at or below warning_threshold_percent, CRITICAL at or below
    -- critical_threshold_percent (the exporter's WARNING/CRITICAL_REMAINING_RATIO x 100).
    warning_threshold_percent  double precision NOT NULL DEFAULT 20,
    critical_threshold_percent double precision NOT NULL DEFAULT 10,
    first_seen_at              timestamptz      NOT NULL,
    last_seen_at               timestamptz      NOT NULL,
    updated_at                 timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, psp_category)
);

COMMENT ON TABLE dict_rate_limit_policies IS
    'One row per DICT policy and participant category as last seen in a snapshot.';

-- One row per policy per snapshot. available_tokens may be negative (a 404 lookup costs 3 tokens):
-- deliberately no CHECK on it.
CREATE TABLE dict_rate_limit_states (
    endpoint_id                   text             NOT NULL,
    psp_category                  char(1)          NOT NULL,
    available_tokens              bigint           NOT NULL,
    capacity                      bigint           NOT NULL,
    refill_tokens                 bigint           NOT NULL,
    refill_period_sec             integer          NOT NULL,
    utilization_percent           double precision NOT NULL,
    remaining_ratio               double precision NOT NULL,
    consumption_rate_per_minute   double precision,
    consumed_tokens               double precision,
    recovery_eta_seconds          double precision NOT NULL,
    exhaustion_projection_seconds double precision,
    error_404_rate                double precision,
    response_time                 timestamptz      NOT NULL,
    correlation_id                text             NOT NULL DEFAULT '',
    created_at                    timestamptz      NOT NULL DEFAULT now(),
    -- Idempotency key of the writer (a retried or duplicated snapshot is skipped) and the index every
    -- per-policy query uses, scanned backwards for "latest".
    PRIMARY KEY (endpoint_id, response_time)
) PARTITION BY RANGE (response_time);

-- The seeds' troubleshooting query reads the newest rows by created_at: without this index it scans every
-- partition (seconds to tens of seconds at a year of data); with it, a few index probes per partition.
CREATE INDEX dict_rate_limit_states_created_at ON dict_rate_limit_states (created_at);

COMMENT ON TABLE dict_rate_limit_states IS
    'Bucket state per policy per snapshot (response_time = DICT ResponseTime); monthly partitions dict_rate_limit_states_YYYY_MM.';
COMMENT ON COLUMN dict_rate_limit_states.consumed_tokens IS
    'Gross tokens consumed since the previous snapshot; NULL for the first snapshot after a start.';
COMMENT ON COLUMN dict_rate_limit_states.exhaustion_projection_seconds IS
    'Seconds until the balance reaches 0 at the current consumption; NULL = never (not draining).';

-- Serializes partition DDL between the writer, maintenance and operators (two replicas creating the same
-- partition at once would otherwise race on the catalog). Key: ascii 'drlpart'.
CREATE FUNCTION create_dict_rate_limit_state_partition(p_month date)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    month_start date := date_trunc('month', p_month)::date;
    part_name   text := 'dict_rate_limit_states_' || to_char(month_start, 'YYYY_MM');
    lower_bound timestamptz := month_start::timestamp AT TIME ZONE 'UTC';
    upper_bound timestamptz := (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC';
BEGIN
    PERFORM pg_advisory_xact_lock(28554171245146484);
    IF to_regclass(quote_ident(part_name)) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF dict_rate_limit_states FOR VALUES FROM (%L) TO (%L)',
                       part_name, lower_bound, upper_bound);
    END IF;
    RETURN part_name;
END;
$$;

COMMENT ON FUNCTION create_dict_rate_limit_state_partition(date) IS
    'Creates the monthly partition holding the given date (UTC month) if missing; returns its name.';

-- Partitions for the reference month, months_back before it and months_ahead after it; returns the
-- names of those it had to create.
CREATE FUNCTION ensure_dict_rate_limit_state_partitions(
    reference    timestamptz DEFAULT now(),
    months_back  integer     DEFAULT 12,
    months_ahead integer     DEFAULT 2)
RETURNS SETOF text
LANGUAGE plpgsql
AS $$
DECLARE
    ref_month date := date_trunc('month', reference AT TIME ZONE 'UTC')::date;
    offs      integer;
    month     date;
BEGIN
    FOR offs IN -months_back .. months_ahead LOOP
        month := (ref_month + make_interval(months => offs))::date;
        IF to_regclass(quote_ident('dict_rate_limit_states_' || to_char(month, 'YYYY_MM'))) IS NULL THEN
            RETURN NEXT create_dict_rate_limit_state_partition(month);
        END IF;
    END LOOP;
END;
$$;

-- Drops the partitions whose whole month ended at least retention_months before reference, so every
-- row is kept at least retention_months. Only partitions named dict_rate_limit_states_YYYY_MM are
-- considered. Returns the dropped names. Never deletes rows.
CREATE FUNCTION drop_old_partitions(
    retention_months integer     DEFAULT 13,
    reference        timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql
AS $$
DECLARE
    cutoff    timestamptz := reference - make_interval(months => retention_months);
    part_name text;
BEGIN
    IF retention_months < 1 THEN
        RAISE EXCEPTION 'retention_months must be >= 1 (got %)', retention_months;
    END IF;
    PERFORM pg_advisory_xact_lock(28554171245146484);
    FOR part_name IN
        SELECT c.relname
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'dict_rate_limit_states'::regclass
           AND c.relname ~ '^dict_rate_limit_states_[0-9]{4}_[0-9]{2}$'
           AND (to_date(right(c.relname, 7), 'YYYY_MM') + interval '1 month')::timestamp
               AT TIME ZONE 'UTC' <= cutoff
         ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part_name);
        RETURN NEXT part_name;
    END LOOP;
END;
$$;

COMMENT ON FUNCTION drop_old_partitions(integer, timestamptz) IS
    'Drops whole monthly partitions ended at least retention_months before reference; returns their names.';

-- The status of a remaining ratio against a policy's percentages (CRITICAL wins).
CREATE FUNCTION dict_rate_limit_status(
    remaining_ratio  double precision,
    warning_percent  double precision,
    critical_percent double precision)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN remaining_ratio * 100 <= coalesce(critical_percent, 10) THEN 'CRITICAL'
        WHEN remaining_ratio * 100 <= coalesce(warning_percent, 20) THEN 'WARNING'
        ELSE 'OK'
    END
$$;

-- One row per policy: its latest snapshot. A LATERAL lookup per known policy walks the primary key
-- backwards through the newest partitions only (ordered partition scan), so the cost is a few index
-- probes per policy whatever the table's size; a DISTINCT ON over the whole table would read it all.
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
         ORDER BY st.response_time DESC
         LIMIT 1) s
  LEFT JOIN dict_rate_limit_policies p
    ON p.endpoint_id = s.endpoint_id AND p.psp_category = s.psp_category;

COMMENT ON VIEW v_dict_rate_limit_latest_states IS
    'Latest snapshot of every policy with utilization and OK/WARNING/CRITICAL by its own thresholds.';

SELECT ensure_dict_rate_limit_state_partitions();
