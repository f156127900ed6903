-- The platform a warmup task pulls (`os/arch[/variant]`), so that a task resumed after a
-- restart pulls the same image it was asked for.
ALTER TABLE warmup_tasks ADD COLUMN platform TEXT NOT NULL DEFAULT 'linux/amd64';
