-- The read models of a SQLite store, in a file of their own beside the database file
-- (`agora.db` → `agora.read.db`), so that writing them never holds the lock the journal's
-- appends need. Everything here is projected from the journal and can be rebuilt from it.
-- Before this file existed these tables lived in the database file (migrations 0001, 0002,
-- 0005 and 0007 there, which 0010 undoes); their shape is the same.

-- How far each projection has applied the journal, written in the projection's transaction.
CREATE TABLE projection_offsets (
    name TEXT    PRIMARY KEY,
    seq  INTEGER NOT NULL
);

-- Orders, one row per accepted order (an id can be used again once its order is gone).
CREATE TABLE orders (
    market       INTEGER NOT NULL,
    order_id     INTEGER NOT NULL,
    accepted_seq INTEGER NOT NULL,  -- the command that accepted it
    user_id      INTEGER NOT NULL,
    side         TEXT    NOT NULL,
    order_type   TEXT    NOT NULL,
    qty          INTEGER NOT NULL,  -- quantity committed (grows with modify increases)
    filled       INTEGER NOT NULL,
    open_qty     INTEGER NOT NULL,
    status       TEXT    NOT NULL,  -- open, filled, cancelled, expired
    updated_seq  INTEGER NOT NULL,
    -- The limit (or protection) price in the market's price units; NULL when it has none.
    price        INTEGER,
    PRIMARY KEY (market, order_id, accepted_seq)
);
-- A user's orders newest first, with or without a status filter; an order by id alone.
CREATE INDEX orders_by_user ON orders (user_id, status, accepted_seq);
CREATE INDEX orders_by_user_seq ON orders (user_id, accepted_seq);
CREATE INDEX orders_by_id ON orders (order_id, accepted_seq);

CREATE TABLE trades (
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
);
-- A user's trades newest first, from either side, and a market's newest trades.
CREATE INDEX trades_by_maker_user ON trades (maker_user, seq, n);
CREATE INDEX trades_by_taker_user ON trades (taker_user, seq, n);
CREATE INDEX trades_by_market ON trades (market, seq, n);

-- Every ledger posting; amounts are decimal strings because they exceed 64 bits.
CREATE TABLE balance_changes (
    seq      INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    owner    TEXT    NOT NULL,  -- user:<id> or fees
    asset    INTEGER NOT NULL,
    bucket   TEXT    NOT NULL,  -- available, held, external
    delta    TEXT    NOT NULL,
    PRIMARY KEY (seq, n)
);

-- One entry per journaled command, chained: hash = SHA-256(prev_hash, seq, kind, detail,
-- command_digest).
CREATE TABLE audit (
    seq            INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL,
    detail         TEXT NOT NULL,
    command_digest BLOB NOT NULL,
    prev_hash      BLOB NOT NULL,
    hash           BLOB NOT NULL
);

-- Withdrawals: one row per withdrawal id, written when it is requested and updated when it
-- is completed or cancelled.
CREATE TABLE withdrawals (
    id            INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL,
    asset         INTEGER NOT NULL,
    amount        TEXT    NOT NULL,  -- minor units, a decimal string (amounts exceed 64 bits)
    destination   TEXT    NOT NULL,
    status        TEXT    NOT NULL,  -- pending, completed, cancelled
    requested_seq INTEGER NOT NULL,
    updated_seq   INTEGER NOT NULL
);
CREATE INDEX withdrawals_by_user ON withdrawals (user_id, id);
CREATE INDEX withdrawals_by_status ON withdrawals (status, id);
