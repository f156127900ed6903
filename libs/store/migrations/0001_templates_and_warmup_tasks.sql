-- Templates (warmed-up images) and the warmup tasks that build them.
--
-- Conventions every later table follows: names are singular-purpose nouns in the plural;
-- states are upper-case TEXT with a CHECK (the API names, so no mapping table); every
-- row has created_at/updated_at TIMESTAMPTZ; ids minted by NanoBox are UUIDv7 (time
-- ordered, so they index well); object-store keys are TEXT.

CREATE TABLE templates (
    name            TEXT PRIMARY KEY,
    image_ref       TEXT NOT NULL,
    -- sha256:... of the image manifest, once resolved.
    manifest_digest TEXT,
    -- Key of the ext4 root filesystem in the object store; several templates can share
    -- one (same manifest digest and init version).
    rootfs_key      TEXT,
    size_bytes      BIGINT CHECK (size_bytes >= 0),
    image_config    JSONB NOT NULL DEFAULT '{}'::jsonb,
    state           TEXT NOT NULL CHECK (state IN
                        ('QUEUED', 'PULLING', 'EXTRACTING', 'BUILDING', 'UPLOADING', 'READY', 'FAILED')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- "Is this root filesystem still used by another template?" when deleting.
CREATE INDEX templates_rootfs_key ON templates (rootfs_key) WHERE rootfs_key IS NOT NULL;

CREATE TABLE warmup_tasks (
    id              UUID PRIMARY KEY,
    -- No foreign key: a task exists before its template is ready, and tasks of a deleted
    -- template stay as history.
    template_name   TEXT NOT NULL,
    image_ref       TEXT NOT NULL,
    manifest_digest TEXT,
    state           TEXT NOT NULL CHECK (state IN
                        ('QUEUED', 'PULLING', 'EXTRACTING', 'BUILDING', 'UPLOADING', 'READY', 'FAILED')),
    layers_done     INTEGER NOT NULL DEFAULT 0 CHECK (layers_done >= 0),
    layers_total    INTEGER NOT NULL DEFAULT 0 CHECK (layers_total >= 0),
    bytes_done      BIGINT NOT NULL DEFAULT 0 CHECK (bytes_done >= 0),
    bytes_total     BIGINT NOT NULL DEFAULT 0 CHECK (bytes_total >= 0),
    -- Why the task failed; NULL otherwise.
    message         TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The latest task of a template (the Status RPC).
CREATE INDEX warmup_tasks_template ON warmup_tasks (template_name, created_at DESC);
-- Unfinished tasks, to resume or fail them after a restart.
CREATE INDEX warmup_tasks_unfinished ON warmup_tasks (created_at)
    WHERE state NOT IN ('READY', 'FAILED');
