-- Rolls 0004 back: the two new causes become the nearest old one (the row stays resolved either way), and
-- the reconciliation source column goes.
ALTER TABLE dict_rate_limit_alerts DROP COLUMN alertmanager_url;
ALTER TABLE dict_rate_limit_alerts DROP CONSTRAINT dict_rate_limit_alerts_resolved_by_check;
COMMENT ON COLUMN dict_rate_limit_alerts.resolved_by IS NULL;
UPDATE dict_rate_limit_alerts SET resolved_by = 'alertmanager' WHERE resolved_by IN ('data_lost', 'reconciled');
ALTER TABLE dict_rate_limit_alerts ADD CONSTRAINT dict_rate_limit_alerts_resolved_by_check
    CHECK (resolved_by IN ('alertmanager', 'auto_resolve'));
