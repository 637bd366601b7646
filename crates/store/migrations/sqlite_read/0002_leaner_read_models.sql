-- Less to write per projected command.
--
-- Fewer B-trees: each table keyed by more than one column was a rowid table plus an index on
-- its key, two B-trees changed for every row.
--   orders: keyed by the command that accepted it (a command accepts at most one order), the
--     rowid itself, so the table is its own key and inserts append at its end.
--   trades, balance_changes: stored in their key's order (WITHOUT ROWID).
--
-- Fewer bytes: an audit entry no longer repeats the previous entry's hash, which is the hash
-- of the entry before it in the table; the chain is checked by recomputing every hash from
-- the one before, as it always was.
--
-- The other rows are copied as they are; nothing about what they hold changes.

CREATE TABLE orders_new (
    accepted_seq INTEGER PRIMARY KEY,  -- the command that accepted it
    market       INTEGER NOT NULL,
    order_id     INTEGER NOT NULL,
    user_id      INTEGER NOT NULL,
    side         TEXT    NOT NULL,
    order_type   TEXT    NOT NULL,
    qty          INTEGER NOT NULL,  -- quantity committed (grows with modify increases)
    filled       INTEGER NOT NULL,
    open_qty     INTEGER NOT NULL,
    status       TEXT    NOT NULL,  -- open, filled, cancelled, expired
    updated_seq  INTEGER NOT NULL,
    -- The limit (or protection) price in the market's price units; NULL when it has none.
    price        INTEGER
);
INSERT INTO orders_new (accepted_seq, market, order_id, user_id, side, order_type, qty, filled, open_qty, status, updated_seq, price)
    SELECT accepted_seq, market, order_id, user_id, side, order_type, qty, filled, open_qty, status, updated_seq, price FROM orders;
DROP TABLE orders;
ALTER TABLE orders_new RENAME TO orders;
-- A user's orders newest first, with or without a status filter; an order by id alone.
CREATE INDEX orders_by_user ON orders (user_id, status, accepted_seq);
CREATE INDEX orders_by_user_seq ON orders (user_id, accepted_seq);
CREATE INDEX orders_by_id ON orders (order_id, accepted_seq);

CREATE TABLE trades_new (
    seq         INTEGER NOT NULL,  -- the command that caused it
    n           INTEGER NOT NULL,  -- its position among that command's trades
    market      INTEGER NOT NULL,
    maker       INTEGER NOT NULL,
    taker       INTEGER NOT NULL,
    maker_user  INTEGER NOT NULL,
    taker_user  INTEGER NOT NULL,
    taker_side  TEXT    NOT NULL,
    price       INTEGER NOT NULL,
    qty         INTEGER NOT NULL,
    PRIMARY KEY (seq, n)
) WITHOUT ROWID;
INSERT INTO trades_new SELECT seq, n, market, maker, taker, maker_user, taker_user, taker_side, price, qty FROM trades;
DROP TABLE trades;
ALTER TABLE trades_new RENAME TO trades;
-- A user's trades newest first, from either side, and a market's newest trades.
CREATE INDEX trades_by_maker_user ON trades (maker_user, seq, n);
CREATE INDEX trades_by_taker_user ON trades (taker_user, seq, n);
CREATE INDEX trades_by_market ON trades (market, seq, n);

-- Every ledger posting; amounts are decimal strings because they exceed 64 bits.
CREATE TABLE balance_changes_new (
    seq      INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    owner    TEXT    NOT NULL,  -- user:<id> or fees
    asset    INTEGER NOT NULL,
    bucket   TEXT    NOT NULL,  -- available, held, external
    delta    TEXT    NOT NULL,
    PRIMARY KEY (seq, n)
) WITHOUT ROWID;
INSERT INTO balance_changes_new SELECT seq, n, owner, asset, bucket, delta FROM balance_changes;
DROP TABLE balance_changes;
ALTER TABLE balance_changes_new RENAME TO balance_changes;

ALTER TABLE audit DROP COLUMN prev_hash;
