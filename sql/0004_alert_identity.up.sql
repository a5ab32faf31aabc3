-- 0004 alert identity and resolution causes (issue 11).
--
-- resolved_by now tells a recovery from a gap in the data:
--   alertmanager  Alertmanager's resolved notification, the data showed the bucket recovered;
--   data_lost     Alertmanager's resolved notification, but the rules had held the alert on its last known
--                 state (no fresh bucket data) until it ended: nobody knows whether the bucket recovered;
--   reconciled    the receiver found the alert gone from Alertmanager without a resolved notification
--                 (Alertmanager does not deliver the resolution of an inhibited or silenced alert);
--   auto_resolve  the daily database safety net (0002).
ALTER TABLE dict_rate_limit_alerts DROP CONSTRAINT dict_rate_limit_alerts_resolved_by_check;
ALTER TABLE dict_rate_limit_alerts ADD CONSTRAINT dict_rate_limit_alerts_resolved_by_check
    CHECK (resolved_by IN ('alertmanager', 'auto_resolve', 'data_lost', 'reconciled'));

-- The receiver finds an alert's episode by fingerprint and a starts_at range (Prometheus replicas start
-- one alert up to an evaluation apart); the unique (fingerprint, starts_at) index serves that range scan.
COMMENT ON COLUMN dict_rate_limit_alerts.resolved_by IS
    'alertmanager (recovered), data_lost (resolved while data was missing), reconciled (gone from Alertmanager without a delivered resolution), auto_resolve (safety net).';

-- The external URL of the Alertmanager that notified the alert first: the receiver reconciles a firing row
-- against that Alertmanager's API (docs/alerting.md), never against one that did not send it.
ALTER TABLE dict_rate_limit_alerts ADD COLUMN alertmanager_url text;
COMMENT ON COLUMN dict_rate_limit_alerts.alertmanager_url IS
    'externalURL of the Alertmanager whose notification created the row (reconciliation source).';
