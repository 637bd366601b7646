-- The job queue. Times are milliseconds since the Unix epoch, given by the caller.

-- Declared queues; a job can only be added to a declared queue.
CREATE TABLE queues (
    name   TEXT    PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0  -- 1: no job is claimed from it
);

CREATE TABLE jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    queue          TEXT    NOT NULL REFERENCES queues (name),
    kind           TEXT    NOT NULL,   -- the job type, which picks the handler
    payload        TEXT    NOT NULL,   -- JSON
    priority       INTEGER NOT NULL,   -- lower runs first
    state          TEXT    NOT NULL,   -- waiting, active, completed, dead, discarded
    run_at_ms      INTEGER NOT NULL,   -- not claimed before (a delay, or a retry's backoff)
    attempts       INTEGER NOT NULL DEFAULT 0,  -- claims so far
    attempts_max   INTEGER NOT NULL,
    backoff        TEXT    NOT NULL,   -- fixed or exponential
    backoff_ms     INTEGER NOT NULL,
    backoff_max_ms INTEGER NOT NULL,
    jitter_pct     INTEGER NOT NULL,   -- 0 to 100: how much of a backoff is random
    timeout_ms     INTEGER NOT NULL,   -- how long one attempt may run (its lease at claim)
    lease          INTEGER NOT NULL DEFAULT 0,  -- fencing token, incremented at every claim
    lease_until_ms INTEGER,
    worker         TEXT,
    dedup_key      TEXT,
    dedup_until_ms INTEGER,
    progress       TEXT,               -- JSON, the handler's last progress report
    result         TEXT,               -- JSON, from completion
    error_category TEXT,               -- of the last failure
    error          TEXT,               -- message of the last failure
    strategy       TEXT,               -- dead jobs: retry_later, manual_review or discard
    created_ms     INTEGER NOT NULL,
    started_ms     INTEGER,
    finished_ms    INTEGER
);
-- Claiming: the next ready jobs of a queue in priority, then due time, then id order.
CREATE INDEX jobs_ready ON jobs (queue, priority, run_at_ms, id) WHERE state = 'waiting';
-- The next due time of a queue, for idle workers to sleep until.
CREATE INDEX jobs_due ON jobs (queue, run_at_ms) WHERE state = 'waiting';
-- Stalled jobs: active ones by lease end.
CREATE INDEX jobs_active ON jobs (lease_until_ms) WHERE state = 'active';
CREATE INDEX jobs_by_state ON jobs (queue, state, id);
-- At most one job per queue holds a deduplication key; it is cleared once its time is up.
CREATE UNIQUE INDEX jobs_dedup ON jobs (queue, dedup_key) WHERE dedup_key IS NOT NULL;

-- Every failed attempt, for the dead-letter queue's history and summaries.
CREATE TABLE job_failures (
    job_id   INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt  INTEGER NOT NULL,
    at_ms    INTEGER NOT NULL,
    category TEXT    NOT NULL,
    message  TEXT    NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX job_failures_by_time ON job_failures (at_ms);
