-- 0009 record alerts, down: receivers of the previous release record alert by alert from Python.
DROP FUNCTION IF EXISTS dict_rate_limit_record_alerts(text[], jsonb, interval, text);
