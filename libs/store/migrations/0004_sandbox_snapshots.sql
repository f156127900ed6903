-- Pause and resume: a paused sandbox's snapshot, for the scheduler.
--
-- Snapshots are node-local until the snapshot store lands: a paused sandbox keeps its
-- node_id (the node holding the snapshot, where a resume must go) while it holds no
-- vCPUs or memory there.

-- The snapshot a paused sandbox is held in. NULL unless PAUSED, or STARTING while a
-- resume from it is in flight (a failed resume goes back to PAUSED with it).
ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT
    CHECK (length(snapshot_id) BETWEEN 1 AND 128);
-- The snapshot it was last resumed from (the API shows it once it runs again); NULL if
-- it never was.
ALTER TABLE sandboxes ADD COLUMN resumed_from TEXT
    CHECK (length(resumed_from) BETWEEN 1 AND 128);
-- When the last resume began: a resume in flight (STARTING) is given the same deadline,
-- counted from here, that a create is given from created_at.
ALTER TABLE sandboxes ADD COLUMN resume_started_at TIMESTAMPTZ;
