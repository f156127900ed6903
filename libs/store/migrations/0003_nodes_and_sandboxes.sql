-- Nodes (KVM hosts running a node agent) and sandboxes (microVMs), for the scheduler.
--
-- Same conventions as 0001: upper-case TEXT states with CHECKs (the API names),
-- created_at/updated_at TIMESTAMPTZ on every row. A sandbox's id is the `sb-` ULID the API
-- shows (time ordered like a UUIDv7, so "newest first" is an index scan on the key).

CREATE TABLE nodes (
    -- From the node's configuration ([agent].node_id).
    id                   TEXT PRIMARY KEY,
    -- host:port the scheduler dials its node agent at.
    address              TEXT NOT NULL,
    state                TEXT NOT NULL CHECK (state IN ('READY', 'DRAINING', 'LOST')),
    capacity_vcpus       INTEGER NOT NULL CHECK (capacity_vcpus >= 0),
    capacity_memory_mb   BIGINT NOT NULL CHECK (capacity_memory_mb >= 0),
    allocated_vcpus      INTEGER NOT NULL DEFAULT 0 CHECK (allocated_vcpus >= 0),
    allocated_memory_mb  BIGINT NOT NULL DEFAULT 0 CHECK (allocated_memory_mb >= 0),
    -- What the node last reported beyond its numbers: cached template digests, ready pool
    -- per template, running sandboxes, labels. Replaced whole by every heartbeat.
    observed             JSONB NOT NULL DEFAULT '{}'::jsonb,
    last_heartbeat       TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sandboxes (
    id               TEXT PRIMARY KEY CHECK (id ~ '^sb-[0-9a-z]{26}$'),
    -- The caller's idempotency key (Create's request_id); NULL when none was given.
    request_id       TEXT UNIQUE CHECK (length(request_id) BETWEEN 1 AND 128),
    -- No foreign key to templates: finished sandboxes stay as history after their
    -- template is deleted, and the template-builder owns template deletion.
    template_name    TEXT NOT NULL,
    template_digest  TEXT NOT NULL,
    -- NULL while pending (not placed yet).
    node_id          TEXT REFERENCES nodes (id),
    -- What the scheduler wants; the reconcile loop drives observed_state towards it.
    desired_state    TEXT NOT NULL CHECK (desired_state IN ('RUNNING', 'PAUSED', 'STOPPED')),
    -- What the node last reported (or the scheduler concluded: LOST).
    observed_state   TEXT NOT NULL CHECK (observed_state IN
                         ('PENDING', 'STARTING', 'RUNNING', 'PAUSED', 'STOPPING', 'STOPPED',
                          'FAILED', 'LOST')),
    vcpus            INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mb        INTEGER NOT NULL CHECK (memory_mb > 0),
    -- NULL keeps the template's own disk size.
    disk_mb          INTEGER CHECK (disk_mb > 0),
    network_mode     TEXT NOT NULL CHECK (network_mode IN ('ISOLATED', 'INTERNAL', 'INTERNET')),
    egress_rate_bps  BIGINT CHECK (egress_rate_bps > 0),
    tenant_scope     TEXT,
    env              JSONB NOT NULL DEFAULT '{}'::jsonb,
    metadata         JSONB NOT NULL DEFAULT '{}'::jsonb,
    timeout_sec      INTEGER NOT NULL CHECK (timeout_sec > 0),
    -- The guest address; empty when isolated or not running.
    ip               TEXT NOT NULL DEFAULT '',
    boot_time_ms     INTEGER NOT NULL DEFAULT 0 CHECK (boot_time_ms >= 0),
    expires_at       TIMESTAMPTZ,
    -- Why it failed or was lost; empty otherwise.
    message          TEXT NOT NULL DEFAULT '',
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The sandboxes of a node (heartbeat reconciliation, a lost node's sandboxes).
CREATE INDEX sandboxes_node ON sandboxes (node_id) WHERE observed_state <> 'STOPPED';
-- Deadlines the reconcile loop enforces.
CREATE INDEX sandboxes_expiry ON sandboxes (expires_at) WHERE desired_state = 'RUNNING';
-- Sandboxes still to be driven to their desired state.
CREATE INDEX sandboxes_unsettled ON sandboxes (updated_at)
    WHERE desired_state = 'STOPPED' AND observed_state NOT IN ('STOPPED', 'FAILED');
