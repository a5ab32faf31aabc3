-- 0002 alerts, down: removes maintenance, auto-resolve and the alert history (the audit trail: back it up first).
DROP FUNCTION IF EXISTS perform_dict_rate_limit_maintenance(integer, timestamptz);
DROP VIEW IF EXISTS v_dict_rate_limit_active_alerts;
DROP FUNCTION IF EXISTS auto_resolve_alerts(interval, text[]);
DROP TABLE IF EXISTS dict_rate_limit_alerts;
