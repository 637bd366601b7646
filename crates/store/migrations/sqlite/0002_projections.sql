-- Read models projected from the journal. Each projection's position is in
-- projection_offsets, written in the same transaction as its rows, so every command is
-- projected exactly once and the tables can be rebuilt from the journal.

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
    PRIMARY KEY (market, order_id, accepted_seq)
);
CREATE INDEX orders_by_user ON orders (user_id, status);

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
