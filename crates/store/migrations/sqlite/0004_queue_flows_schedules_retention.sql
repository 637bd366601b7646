-- Parent and child jobs, retention, and cron or interval schedules.

-- A parent job waits in state 'waiting_children' until its pending children have ended;
-- on_child_failure says what a dead child does to it: fail_parent, ignore or wait.
ALTER TABLE jobs ADD COLUMN parent_id INTEGER;
ALTER TABLE jobs ADD COLUMN children_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN on_child_failure TEXT;
-- A child: 1 once its end has been counted at its parent (so a re-driven or discarded child
-- is never counted twice).
ALTER TABLE jobs ADD COLUMN parent_counted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_children ON jobs (parent_id) WHERE parent_id IS NOT NULL;

-- Retention: a job's own rule (how long to keep it once completed, once dead or discarded)
-- becomes purge_at_ms when it ends; the clean-up deletes it after that time.
ALTER TABLE jobs ADD COLUMN keep_completed_ms INTEGER;
ALTER TABLE jobs ADD COLUMN keep_failed_ms INTEGER;
ALTER TABLE jobs ADD COLUMN purge_at_ms INTEGER;
CREATE INDEX jobs_purge ON jobs (purge_at_ms) WHERE purge_at_ms IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (queue, state, finished_ms) WHERE state IN ('completed', 'dead', 'discarded');

-- A queue's rules: keep the last N and/or the last T of its completed and failed jobs.
ALTER TABLE queues ADD COLUMN keep_completed_last INTEGER;
ALTER TABLE queues ADD COLUMN keep_completed_ms INTEGER;
ALTER TABLE queues ADD COLUMN keep_failed_last INTEGER;
ALTER TABLE queues ADD COLUMN keep_failed_ms INTEGER;

-- The schedule tick a job was enqueued for: at most one job per tick, whoever fires it.
ALTER TABLE jobs ADD COLUMN schedule TEXT;
ALTER TABLE jobs ADD COLUMN schedule_tick_ms INTEGER;
CREATE UNIQUE INDEX jobs_schedule_tick ON jobs (schedule, schedule_tick_ms) WHERE schedule IS NOT NULL;

-- Schedules: a job template enqueued at every tick of a cron expression or an interval.
CREATE TABLE job_schedules (
    name           TEXT    PRIMARY KEY,
    queue          TEXT    NOT NULL REFERENCES queues (name),
    kind           TEXT    NOT NULL,
    payload        TEXT    NOT NULL,   -- JSON
    cron           TEXT,               -- five-field crontab, UTC; or
    every_ms       INTEGER,            -- a fixed interval
    next_tick_ms   INTEGER NOT NULL,   -- the next tick to enqueue
    priority       INTEGER NOT NULL,
    attempts_max   INTEGER NOT NULL,
    backoff        TEXT    NOT NULL,
    backoff_ms     INTEGER NOT NULL,
    backoff_max_ms INTEGER NOT NULL,
    jitter_pct     INTEGER NOT NULL,
    timeout_ms     INTEGER NOT NULL,
    keep_completed_ms INTEGER,
    keep_failed_ms INTEGER,
    created_ms     INTEGER NOT NULL
);
CREATE INDEX job_schedules_due ON job_schedules (next_tick_ms);

-- Failure history keyed by its own id: a re-driven job starts its attempts again, and its new
-- failures must join the history, not collide with the old ones on (job_id, attempt).
CREATE TABLE job_failures_v2 (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id   INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt  INTEGER NOT NULL,
    at_ms    INTEGER NOT NULL,
    category TEXT    NOT NULL,
    message  TEXT    NOT NULL
);
INSERT INTO job_failures_v2 (job_id, attempt, at_ms, category, message)
    SELECT job_id, attempt, at_ms, category, message FROM job_failures ORDER BY job_id, attempt;
DROP TABLE job_failures;
ALTER TABLE job_failures_v2 RENAME TO job_failures;
CREATE INDEX job_failures_by_job ON job_failures (job_id, id);
CREATE INDEX job_failures_by_time ON job_failures (at_ms);
