-- ferry-server metadata (seed 004's tnv_storagedb / tnv_idsdb, one database in all-in-one mode).
-- Applied at every start; every statement is idempotent.

-- Stored files. `id` is the file id clients see (server-generated, never client text); `num` is
-- the numeric id from the id allocator that also names the path. A record made by an instant
-- upload has its own id and path (a hard link to the same content), so deleting one record never
-- breaks another.
CREATE TABLE IF NOT EXISTS files (
    id          TEXT PRIMARY KEY,
    num         INTEGER NOT NULL UNIQUE,
    app         TEXT NOT NULL,
    user        TEXT NOT NULL,
    -- 0 = committing (content verified, rename in progress), 1 = stored
    status      INTEGER NOT NULL,
    path        TEXT NOT NULL,          -- relative to the data dir
    size        INTEGER NOT NULL,
    sha256      BLOB NOT NULL,
    name        TEXT NOT NULL,
    block_size  INTEGER NOT NULL,
    crcs        BLOB NOT NULL,          -- CRC32C of every block, u32 BE each
    created     INTEGER NOT NULL,       -- Unix seconds
    updated     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_content ON files (app, sha256, size);

-- Big-file upload sessions (seed 002), kept so a breakpoint query survives any restart.
CREATE TABLE IF NOT EXISTS upload_sessions (
    id              BLOB PRIMARY KEY,   -- 16 random bytes
    app             TEXT NOT NULL,
    user            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    block_size      INTEGER NOT NULL,
    blocks          INTEGER NOT NULL,
    sha256          BLOB NOT NULL,
    name            TEXT NOT NULL,
    temp_path       TEXT NOT NULL,      -- relative to the data dir
    created         INTEGER NOT NULL,
    expires         INTEGER NOT NULL,   -- Unix milliseconds; refreshed by activity
    -- instant upload: the stored file whose content the challenge is taken from
    challenge_file  TEXT,
    challenge_off   INTEGER NOT NULL DEFAULT 0,
    challenge_len   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_key ON upload_sessions (app, user, size, block_size, sha256);

-- Blocks acknowledged for a session: a row exists only once the block's bytes were written
-- (and synced) and its CRC checked.
CREATE TABLE IF NOT EXISTS session_blocks (
    upload_id   BLOB NOT NULL,
    idx         INTEGER NOT NULL,
    crc         INTEGER NOT NULL,
    PRIMARY KEY (upload_id, idx)
) WITHOUT ROWID;

-- Uploads that ended in a stored file, by big-file session id or small-file upload key, so a
-- repeated UPLOAD_OVER, UPLOAD_PROVE or UPLOAD (its first reply was lost with a dying proxy or
-- server) gets the same file id instead of "unknown upload" or a second copy. Written in the
-- transaction that inserts the committing file row (a lookup only sees stored files, and the
-- commit deletes the session the row finishes); expired like sessions.
CREATE TABLE IF NOT EXISTS finished_uploads (
    upload_id   BLOB PRIMARY KEY,
    app         TEXT NOT NULL,
    user        TEXT NOT NULL,
    file_id     TEXT NOT NULL,
    finished    INTEGER NOT NULL        -- Unix milliseconds
);

-- Id allocator steps (seed 004's t_id_gen): the next value not yet handed out to memory.
CREATE TABLE IF NOT EXISTS id_steps (
    key         TEXT PRIMARY KEY,
    next        INTEGER NOT NULL,
    updated     INTEGER NOT NULL
);
