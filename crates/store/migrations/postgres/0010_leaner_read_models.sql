-- Less to write per projected command.
--
-- An order is keyed by the command that accepted it (a command accepts at most one order):
-- one column to compare on every upsert instead of three, and a smaller key index.
ALTER TABLE orders DROP CONSTRAINT orders_pkey;
ALTER TABLE orders ADD PRIMARY KEY (accepted_seq);

-- An audit entry no longer repeats the previous entry's hash, which is the hash of the entry
-- before it in the table; the chain is checked by recomputing every hash from the one before.
ALTER TABLE audit DROP COLUMN prev_hash;
