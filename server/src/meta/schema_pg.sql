-- ferry-server metadata on PostgreSQL: the same tables and columns as schema.sql (SQLite) at
-- schema version 3, with PostgreSQL types. Every integer is BIGINT (u32 CRCs and sizes fit
-- without sign tricks); `user` is a reserved word here, so it is always quoted.
-- Applied at every start under an advisory lock; every statement is idempotent.

CREATE TABLE IF NOT EXISTS files (
    id          TEXT PRIMARY KEY,
    num         BIGINT NOT NULL UNIQUE,
    app         TEXT NOT NULL,
    "user"      TEXT NOT NULL,
    status      BIGINT NOT NULL,      -- 0 committing, 1 stored, 2 deleting
    path        TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      BYTEA NOT NULL,
    name        TEXT NOT NULL,
    block_size  BIGINT NOT NULL,
    crcs        BYTEA NOT NULL,
    created     BIGINT NOT NULL,
    updated     BIGINT NOT NULL,
    node        TEXT NOT NULL DEFAULT '', -- the node committing it (schema version 2)
    grp         TEXT NOT NULL DEFAULT ''  -- its storage group (schema version 4)
);
CREATE INDEX IF NOT EXISTS files_content ON files (app, sha256, size);
CREATE INDEX IF NOT EXISTS files_status ON files (status) WHERE status <> 1;
CREATE INDEX IF NOT EXISTS files_owner ON files (app, "user");  -- schema version 5: quotas

CREATE TABLE IF NOT EXISTS upload_sessions (
    id              BYTEA PRIMARY KEY,
    app             TEXT NOT NULL,
    "user"          TEXT NOT NULL,
    size            BIGINT NOT NULL,
    block_size      BIGINT NOT NULL,
    blocks          BIGINT NOT NULL,
    sha256          BYTEA NOT NULL,
    name            TEXT NOT NULL,
    temp_path       TEXT NOT NULL,
    created         BIGINT NOT NULL,
    expires         BIGINT NOT NULL,
    challenge_file  TEXT,
    challenge_off   BIGINT NOT NULL DEFAULT 0,
    challenge_len   BIGINT NOT NULL DEFAULT 0,
    grp             TEXT NOT NULL DEFAULT ''    -- its storage group (schema version 4)
);
CREATE INDEX IF NOT EXISTS sessions_key ON upload_sessions (app, "user", size, block_size, sha256);

CREATE TABLE IF NOT EXISTS session_blocks (
    upload_id   BYTEA NOT NULL,
    idx         BIGINT NOT NULL,
    crc         BIGINT NOT NULL,
    PRIMARY KEY (upload_id, idx)
);

CREATE TABLE IF NOT EXISTS finished_uploads (
    upload_id   BYTEA PRIMARY KEY,
    app         TEXT NOT NULL,
    "user"      TEXT NOT NULL,
    file_id     TEXT NOT NULL,
    finished    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS finished_file ON finished_uploads (file_id);
CREATE INDEX IF NOT EXISTS finished_age ON finished_uploads (finished);  -- schema version 3

CREATE TABLE IF NOT EXISTS id_steps (
    key         TEXT PRIMARY KEY,
    next        BIGINT NOT NULL,
    updated     BIGINT NOT NULL
);

-- Small-upload keys being written (schema version 2): the primary key is what stops two nodes
-- from storing the same key twice.
CREATE TABLE IF NOT EXISTS upload_claims (
    app         TEXT NOT NULL,
    "user"      TEXT NOT NULL,
    key         BYTEA NOT NULL,
    node        TEXT NOT NULL,
    claimed     BIGINT NOT NULL,
    PRIMARY KEY (app, "user", key)
);

CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
