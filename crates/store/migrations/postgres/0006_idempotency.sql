-- Idempotency keys of the API: a key names one request of one user; the same key with the
-- same request gets the stored answer again. A row is written before its command is
-- sequenced (pending: no status yet) and completed with the answer afterwards.
CREATE TABLE idempotency_keys (
    user_id      BIGINT NOT NULL,
    key          TEXT    NOT NULL,
    request_hash BYTEA    NOT NULL,  -- SHA-256 of method, path and body
    order_id     BIGINT,              -- the order a placement creates, chosen before it is sequenced
    status       BIGINT,              -- NULL while pending
    response     BYTEA,
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_by_expiry ON idempotency_keys (expires_ms);
