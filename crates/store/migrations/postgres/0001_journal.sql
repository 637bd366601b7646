-- The journal: batches of encoded commands, each chained to the previous one by checksum.
CREATE TABLE journal (
    batch      BIGINT PRIMARY KEY,  -- 1, 2, 3, … without gaps
    first_seq  BIGINT NOT NULL,     -- sequence number of the batch's first command
    commands   BIGINT NOT NULL,     -- number of commands in the batch
    payload    BYTEA  NOT NULL,     -- the encoded commands
    checksum   BYTEA  NOT NULL      -- SHA-256 over the previous checksum and this row
);

-- Snapshots of the whole state after command `seq`.
CREATE TABLE snapshots (
    seq           BIGINT PRIMARY KEY,
    state_hash    BYTEA  NOT NULL,
    payload       BYTEA  NOT NULL,
    checksum      BYTEA  NOT NULL,  -- SHA-256 over seq, state_hash and payload
    created_at_ms BIGINT NOT NULL
);

-- How far each projection has applied the journal, written in the projection's transaction.
CREATE TABLE projection_offsets (
    name TEXT   PRIMARY KEY,
    seq  BIGINT NOT NULL
);
