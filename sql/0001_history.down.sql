-- 0001 history, down: removes the history schema (and every stored bucket state with it).
DROP VIEW IF EXISTS v_dict_rate_limit_latest_states;
DROP FUNCTION IF EXISTS dict_rate_limit_status(double precision, double precision, double precision);
DROP FUNCTION IF EXISTS drop_old_partitions(integer, timestamptz);
DROP FUNCTION IF EXISTS ensure_dict_rate_limit_state_partitions(timestamptz, integer, integer);
DROP FUNCTION IF EXISTS create_dict_rate_limit_state_partition(date);
-- Dropping the partitioned table drops every partition.
DROP TABLE IF EXISTS dict_rate_limit_states;
DROP TABLE IF EXISTS dict_rate_limit_policies;
