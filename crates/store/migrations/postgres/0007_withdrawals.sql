-- Withdrawals, a read model projected from the journal like orders: one row per withdrawal
-- id, written when it is requested and updated when it is completed or cancelled.
CREATE TABLE withdrawals (
    id            BIGINT PRIMARY KEY,
    user_id       BIGINT NOT NULL,
    asset         BIGINT NOT NULL,
    amount        TEXT    NOT NULL,  -- minor units, a decimal string (amounts exceed 64 bits)
    destination   TEXT    NOT NULL,
    status        TEXT    NOT NULL,  -- pending, completed, cancelled
    requested_seq BIGINT NOT NULL,
    updated_seq   BIGINT NOT NULL
);
CREATE INDEX withdrawals_by_user ON withdrawals (user_id, id);
CREATE INDEX withdrawals_by_status ON withdrawals (status, id);
