-- Batch workers (SPEC §7): the worker template a worker was made from, how many of its group
-- may be enqueued or running at once, and its failure strategy.
ALTER TABLE steps ADD COLUMN batch_group TEXT;
ALTER TABLE steps ADD COLUMN batch_parallelism INTEGER;
ALTER TABLE steps ADD COLUMN batch_strategy TEXT;
CREATE INDEX steps_batch ON steps (task_uuid, batch_group, state) WHERE batch_group IS NOT NULL;
