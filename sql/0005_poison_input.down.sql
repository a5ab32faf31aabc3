-- 0005 poison input, down: back to 0004's schema. Set-aside snapshots are dropped with their table (so are
-- the far-future state rows the up migration moved there: they are not put back);
-- set-aside outbox events become ordinary unsent events again (the relay retries them); a
-- refill_period_sec above 2^31 - 1 makes this fail (it cannot be stored in integer): delete such rows first.
DROP INDEX dict_rate_limit_alert_outbox_set_aside;
DROP INDEX dict_rate_limit_alert_outbox_unsent;
CREATE INDEX dict_rate_limit_alert_outbox_unsent ON dict_rate_limit_alert_outbox (id) WHERE sent_at IS NULL;
ALTER TABLE dict_rate_limit_alert_outbox DROP COLUMN set_aside_reason, DROP COLUMN set_aside_at;

DROP VIEW v_dict_rate_limit_latest_states;
DROP FUNCTION dict_rate_limit_plausible_until();
DROP TABLE dict_rate_limit_rejected_snapshots;
ALTER TABLE dict_rate_limit_states ALTER COLUMN refill_period_sec TYPE integer;
ALTER TABLE dict_rate_limit_policies ALTER COLUMN refill_period_sec TYPE integer;

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
