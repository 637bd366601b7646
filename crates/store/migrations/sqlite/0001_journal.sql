-- The journal: batches of encoded commands, each chained to the previous one by checksum.
CREATE TABLE journal (
    batch      INTEGER PRIMARY KEY,  -- 1, 2, 3, … without gaps
    first_seq  INTEGER NOT NULL,     -- sequence number of the batch's first command
    commands   INTEGER NOT NULL,     -- number of commands in the batch
    payload    BLOB    NOT NULL,     -- the encoded commands
    checksum   BLOB    NOT NULL      -- SHA-256 over the previous checksum and this row
);

-- Snapshots of the whole state after command `seq`.
CREATE TABLE snapshots (
    seq           INTEGER PRIMARY KEY,
    state_hash    BLOB    NOT NULL,
    payload       BLOB    NOT NULL,
    checksum      BLOB    NOT NULL,  -- SHA-256 over seq, state_hash and payload
    created_at_ms INTEGER NOT NULL
);

-- How far each projection has applied the journal, written in the projection's transaction.
CREATE TABLE projection_offsets (
    name TEXT    PRIMARY KEY,
    seq  INTEGER NOT NULL
);
