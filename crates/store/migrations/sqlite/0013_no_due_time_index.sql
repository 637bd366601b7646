-- jobs_due (queue, due time) served one query, when a queue's next waiting job falls due, and
-- every add and every claim wrote it (on SQLite about 4,400 of the 34,000 instructions a
-- claimed job costs the writer). The ready index answers that query too (`next_due_ms` in
-- crates/store/src/queue.rs): the earliest due time within each of the queue's few
-- priorities, found by skipping from one priority to the next. Without it, a claim also has
-- no other index to choose (see migration 0009).
DROP INDEX jobs_due;
