-- The read models moved to a file of their own (migrations/sqlite_read), so that writing
-- them no longer takes the database file's single write lock from the journal's appends.
-- They are projected from the journal: the projector finds its offset at zero in the new
-- file and rebuilds them on the next start.
DROP TABLE withdrawals;
DROP TABLE audit;
DROP TABLE balance_changes;
DROP TABLE trades;
DROP TABLE orders;
DROP TABLE projection_offsets;
