-- The jobs tables keep their links by the store's own statements, not by foreign keys.
-- A foreign key costs a lookup per row written, and ON DELETE CASCADE runs a sub-program per
-- deleted job: on PostgreSQL a trigger per row (about 9 us per added job for the queue's key,
-- 7.5 us per deleted job for the cascade, measured here), on SQLite about a tenth of the work
-- of completing a job. The store checks a job's queue when it adds the job (queues are never
-- deleted), and every statement that deletes jobs deletes their failure history in the same
-- transaction (crates/store/src/queue.rs).
--
-- SQLite cannot drop a foreign key: both tables are rebuilt, failures first, so that no
-- table refers to jobs when it is dropped. Each keeps its AUTOINCREMENT counter, so that no
-- id, which leases and external workers name, is ever given twice.

CREATE TABLE job_failures_new (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id   INTEGER NOT NULL,   -- jobs (id); deleted with the job
    attempt  INTEGER NOT NULL,
    at_ms    INTEGER NOT NULL,
    category TEXT    NOT NULL,
    message  TEXT    NOT NULL
);
INSERT INTO job_failures_new (id, job_id, attempt, at_ms, category, message)
    SELECT id, job_id, attempt, at_ms, category, message FROM job_failures;
DELETE FROM sqlite_sequence WHERE name = 'job_failures_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'job_failures_new', seq FROM sqlite_sequence WHERE name = 'job_failures';
DROP TABLE job_failures;
ALTER TABLE job_failures_new RENAME TO job_failures;
CREATE INDEX job_failures_by_job ON job_failures (job_id, id);
CREATE INDEX job_failures_by_time ON job_failures (at_ms);

CREATE TABLE jobs_new (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    queue             TEXT    NOT NULL,   -- queues (name), checked when the job is added
    kind              TEXT    NOT NULL,   -- the job type, which picks the handler
    payload           TEXT    NOT NULL,   -- JSON
    priority          INTEGER NOT NULL,   -- lower runs first
    state             TEXT    NOT NULL,   -- store::JOB_STATES
    run_at_ms         INTEGER NOT NULL,   -- not claimed before (a delay, or a retry's backoff)
    attempts          INTEGER NOT NULL DEFAULT 0,  -- claims so far
    attempts_max      INTEGER NOT NULL,
    backoff           TEXT    NOT NULL,   -- fixed or exponential
    backoff_ms        INTEGER NOT NULL,
    backoff_max_ms    INTEGER NOT NULL,
    jitter_pct        INTEGER NOT NULL,   -- 0 to 100: how much of a backoff is random
    timeout_ms        INTEGER NOT NULL,   -- how long one attempt may run (its lease at claim)
    lease             INTEGER NOT NULL DEFAULT 0,  -- fencing token, incremented at every claim
    lease_until_ms    INTEGER,
    worker            TEXT,
    dedup_key         TEXT,
    dedup_until_ms    INTEGER,
    progress          TEXT,               -- JSON, the handler's last progress report
    result            TEXT,               -- JSON, from completion
    error_category    TEXT,               -- of the last failure
    error             TEXT,               -- message of the last failure; set by every failure
    strategy          TEXT,               -- dead jobs: retry_later, manual_review or discard
    created_ms        INTEGER NOT NULL,
    started_ms        INTEGER,
    finished_ms       INTEGER,
    parent_id         INTEGER,
    children_pending  INTEGER NOT NULL DEFAULT 0,
    on_child_failure  TEXT,
    parent_counted    INTEGER NOT NULL DEFAULT 0,
    keep_completed_ms INTEGER,
    keep_failed_ms    INTEGER,
    purge_at_ms       INTEGER,
    schedule          TEXT,
    schedule_tick_ms  INTEGER
);
INSERT INTO jobs_new SELECT * FROM jobs;
DELETE FROM sqlite_sequence WHERE name = 'jobs_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'jobs_new', seq FROM sqlite_sequence WHERE name = 'jobs';
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_ready ON jobs (queue, priority, run_at_ms, id) WHERE state = 'waiting';
CREATE INDEX jobs_due ON jobs (queue, run_at_ms) WHERE state = 'waiting' AND priority >= 0;
CREATE INDEX jobs_active ON jobs (lease_until_ms) WHERE state = 'active';
CREATE INDEX jobs_by_state ON jobs (queue, state, id)
    WHERE state <> 'waiting' AND state <> 'active';
CREATE INDEX jobs_finished ON jobs (queue, state, finished_ms)
    WHERE state <> 'waiting' AND state <> 'active' AND state <> 'waiting_children';
CREATE UNIQUE INDEX jobs_dedup ON jobs (queue, dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX jobs_children ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_purge ON jobs (purge_at_ms) WHERE purge_at_ms IS NOT NULL;
CREATE UNIQUE INDEX jobs_schedule_tick ON jobs (schedule, schedule_tick_ms) WHERE schedule IS NOT NULL;
