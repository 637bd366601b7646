-- The predicates of the two partial indexes over jobs at rest no longer list states with IN.
-- SQLite tests an index's predicate on the old and the new row of every job it writes, and
-- it tests `state IN (a, b, c)` there by building a temporary table of the list, for each row
-- and each such index: a claim built four of them per job, an add or a deletion two. The same
-- sets, written as comparisons, cost one test each. Queries name these predicates word for
-- word (`at_rest!` and `ended!` in crates/store/src/queue.rs), so that the planners see that
-- the indexes apply. The six states are listed in `store::JOB_STATES`.
DROP INDEX jobs_by_state;
-- Waiting for children, or ended.
CREATE INDEX jobs_by_state ON jobs (queue, state, id)
    WHERE state <> 'waiting' AND state <> 'active';
DROP INDEX jobs_finished;
-- Ended: completed, dead or discarded.
CREATE INDEX jobs_finished ON jobs (queue, state, finished_ms)
    WHERE state <> 'waiting' AND state <> 'active' AND state <> 'waiting_children';
