-- 0006 poller lease: exporter replicas sharing one database elect one poller of the Bridge, and the
-- others serve the snapshot it derived (docs/exporter.md, "Several replicas: one poller").
--
-- A lease row, not a session advisory lock: a frozen leader (SIGSTOP, a stalled VM) keeps its session and
-- its TCP connection open (the kernel still answers keepalives), so an advisory lock would never be
-- released; a lease expires on the database's clock whatever the holder's state. `term` grows at every
-- change of holder and fences the holder: each renewal, poll permit and published snapshot is an UPDATE
-- that matches the holder's term, so a leader that was replaced cannot poll or publish any more.

CREATE TABLE dict_rate_limit_poller_lease (
    poller_group   text        PRIMARY KEY,   -- POLLER_GROUP: replicas of one exporter deployment
    holder         text        NOT NULL,      -- replica id (host, pid, random suffix) of the leader
    term           bigint      NOT NULL,      -- +1 at every change of holder (fencing token)
    acquired_at    timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,      -- database clock; renewed by the leader several times a lease
    -- When the group last called the Bridge, whichever replica did: a new leader waits for the next
    -- interval after it, so failovers never spend more than one list call per interval.
    last_poll_at   timestamptz,
    last_poll_term bigint
);

COMMENT ON TABLE dict_rate_limit_poller_lease IS
    'Leader lease of each exporter poller group: who may call the Bridge, until when, and when it last did.';

-- The latest derived snapshot of each group, written by the leader after each successful poll (fenced by
-- its term) and read by the other replicas, so every replica serves the same values, ResponseTime and
-- consumed-tokens counters. Bucket history stays in dict_rate_limit_states.
CREATE TABLE dict_rate_limit_shared_snapshot (
    poller_group   text        PRIMARY KEY,
    term           bigint      NOT NULL,      -- the leader term that published it
    response_time  timestamptz NOT NULL,      -- DICT ResponseTime of the snapshot
    published_at   timestamptz NOT NULL,      -- database clock: followers measure freshness from it
    snapshot       jsonb       NOT NULL       -- the derived snapshot (exporter/history/shared_snapshot.py)
);

COMMENT ON TABLE dict_rate_limit_shared_snapshot IS
    'Latest derived snapshot of each exporter poller group, served by every replica of the group.';

-- Replicas of each group seen recently (every replica refreshes its row a few times per lease). A leader
-- that loses the database keeps polling only if it saw no other replica: then nobody else can take over,
-- and stopping would only blind a single-replica deployment (docs/exporter.md, "Database outage").
CREATE TABLE dict_rate_limit_poller_members (
    poller_group text        NOT NULL,
    holder       text        NOT NULL,
    seen_at      timestamptz NOT NULL,
    PRIMARY KEY (poller_group, holder)
);

COMMENT ON TABLE dict_rate_limit_poller_members IS
    'Exporter replicas of each poller group and when each was last seen (its lease loop).';
