-- Idempotency keys of the API: a key names one request of one user; the same key with the
-- same request gets the stored answer again. A row is written before its command is
-- sequenced (pending: no status yet) and completed with the answer afterwards.
CREATE TABLE idempotency_keys (
    user_id      INTEGER NOT NULL,
    key          TEXT    NOT NULL,
    request_hash BLOB    NOT NULL,  -- SHA-256 of method, path and body
    order_id     INTEGER,              -- the order a placement creates, chosen before it is sequenced
    status       INTEGER,              -- NULL while pending
    response     BLOB,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_by_expiry ON idempotency_keys (expires_ms);
