-- 0006 down: the exporter replicas go back to polling each on their own (run one replica only).
DROP TABLE IF EXISTS dict_rate_limit_poller_members;
DROP TABLE IF EXISTS dict_rate_limit_shared_snapshot;
DROP TABLE IF EXISTS dict_rate_limit_poller_lease;
