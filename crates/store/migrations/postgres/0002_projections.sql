-- Read models projected from the journal. Each projection's position is in
-- projection_offsets, written in the same transaction as its rows, so every command is
-- projected exactly once and the tables can be rebuilt from the journal.

-- Orders, one row per accepted order (an id can be used again once its order is gone).
CREATE TABLE orders (
    market       BIGINT NOT NULL,
    order_id     BIGINT NOT NULL,
    accepted_seq BIGINT NOT NULL,  -- the command that accepted it
    user_id      BIGINT NOT NULL,
    side         TEXT    NOT NULL,
    order_type   TEXT    NOT NULL,
    qty          BIGINT NOT NULL,  -- quantity committed (grows with modify increases)
    filled       BIGINT NOT NULL,
    open_qty     BIGINT NOT NULL,
    status       TEXT    NOT NULL,  -- open, filled, cancelled, expired
    updated_seq  BIGINT NOT NULL,
    PRIMARY KEY (market, order_id, accepted_seq)
);
CREATE INDEX orders_by_user ON orders (user_id, status);

CREATE TABLE trades (
    seq         BIGINT NOT NULL,  -- the command that caused it
    n           BIGINT NOT NULL,  -- its position among that command's trades
    market      BIGINT NOT NULL,
    maker       BIGINT NOT NULL,
    taker       BIGINT NOT NULL,
    maker_user  BIGINT NOT NULL,
    taker_user  BIGINT NOT NULL,
    taker_side  TEXT    NOT NULL,
    price       BIGINT NOT NULL,
    qty         BIGINT NOT NULL,
    PRIMARY KEY (seq, n)
);

-- Every ledger posting; amounts are decimal strings because they exceed 64 bits.
CREATE TABLE balance_changes (
    seq      BIGINT NOT NULL,
    n        BIGINT NOT NULL,
    owner    TEXT    NOT NULL,  -- user:<id> or fees
    asset    BIGINT NOT NULL,
    bucket   TEXT    NOT NULL,  -- available, held, external
    delta    TEXT    NOT NULL,
    PRIMARY KEY (seq, n)
);

-- One entry per journaled command, chained: hash = SHA-256(prev_hash, seq, kind, detail,
-- command_digest).
CREATE TABLE audit (
    seq            BIGINT PRIMARY KEY,
    kind           TEXT NOT NULL,
    detail         TEXT NOT NULL,
    command_digest BYTEA NOT NULL,
    prev_hash      BYTEA NOT NULL,
    hash           BYTEA NOT NULL
);
