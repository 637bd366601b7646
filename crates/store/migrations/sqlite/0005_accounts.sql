-- Accounts (users and their API keys) and the indexes the server's read-model queries need.
-- Times are milliseconds since the Unix epoch, given by the caller.

-- AUTOINCREMENT: an id is never given out again, even after the newest user is deleted, so
-- an id in a journaled command or an old log always names the same person.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL UNIQUE,  -- case-sensitive (the default BINARY collation)
    password_hash TEXT    NOT NULL,         -- the hash, never the password
    role          TEXT    NOT NULL,
    created_ms    INTEGER NOT NULL
);

-- The secret is stored because verifying an HMAC signature needs it.
CREATE TABLE api_keys (
    key_id     TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    secret     TEXT    NOT NULL,
    label      TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0  -- 1: refused from then on
);
CREATE INDEX api_keys_by_user ON api_keys (user_id);

-- A user's orders newest first, with or without a status filter.
DROP INDEX orders_by_user;
CREATE INDEX orders_by_user ON orders (user_id, status, accepted_seq);
CREATE INDEX orders_by_user_seq ON orders (user_id, accepted_seq);

-- A user's trades newest first, from either side, and a market's newest trades.
CREATE INDEX trades_by_maker_user ON trades (maker_user, seq, n);
CREATE INDEX trades_by_taker_user ON trades (taker_user, seq, n);
CREATE INDEX trades_by_market ON trades (market, seq, n);

-- The limit (or protection) price of an order, in the market's price units; NULL when it has
-- none. Rows projected before this column existed keep NULL.
ALTER TABLE orders ADD COLUMN price INTEGER;
-- Order ids come from one counter across markets, so an id alone finds its order.
CREATE INDEX orders_by_id ON orders (order_id, accepted_seq);
