-- jobs_due serves one query: when a queue's next waiting job falls due (`next_due_ms`). A
-- claim must read jobs_ready, in its order, and stop after the jobs it takes. PostgreSQL's
-- planner, without statistics on a table filled faster than autovacuum analyses it, took
-- jobs_due for claims instead and sorted every waiting job at each claim (with 100,000
-- waiting jobs, 50,000 rows read a claim on average). The predicate now also names
-- `priority >= 0`, which every job meets (priorities run from 0 up) and which a claim does not
-- state, so that only the query that states it, the due-time query, can use this index.
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (queue, run_at_ms) WHERE state = 'waiting' AND priority >= 0;
