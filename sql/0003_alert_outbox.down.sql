-- 0003 alert outbox, down: removes the trigger and the outbox (unsent events are lost: drain it first).
DROP TRIGGER IF EXISTS dict_rate_limit_alerts_outbox ON dict_rate_limit_alerts;
DROP FUNCTION IF EXISTS dict_rate_limit_alert_outbox_enqueue();
DROP FUNCTION IF EXISTS dict_rate_limit_alert_event_id(text, timestamptz, text);
DROP TABLE IF EXISTS dict_rate_limit_alert_outbox;
