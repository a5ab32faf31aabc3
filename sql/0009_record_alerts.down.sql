-- 0009 record alerts, down: receivers of the previous release record alert by alert from Python, and
-- the row trigger of 0003/0007 queues the outbox rows of inserts again.
DROP TRIGGER IF EXISTS dict_rate_limit_alerts_outbox_inserted ON dict_rate_limit_alerts;
DROP FUNCTION IF EXISTS dict_rate_limit_alert_outbox_enqueue_inserted();
DROP TRIGGER IF EXISTS dict_rate_limit_alerts_outbox ON dict_rate_limit_alerts;
CREATE TRIGGER dict_rate_limit_alerts_outbox
    AFTER INSERT OR UPDATE OF status ON dict_rate_limit_alerts
    FOR EACH ROW EXECUTE FUNCTION dict_rate_limit_alert_outbox_enqueue();
DROP FUNCTION IF EXISTS dict_rate_limit_record_alerts(text[], jsonb, interval, text);
