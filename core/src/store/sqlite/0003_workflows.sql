-- Workflow steps (SPEC §8): a child task remembers the task and the step that started it, so
-- the step can finish when the child does and cancelling the parent reaches the child.
ALTER TABLE tasks ADD COLUMN parent_task_uuid TEXT;
ALTER TABLE tasks ADD COLUMN parent_step_uuid TEXT;
CREATE INDEX tasks_by_parent_step ON tasks (parent_step_uuid) WHERE parent_step_uuid IS NOT NULL;
CREATE INDEX tasks_by_parent_task ON tasks (parent_task_uuid) WHERE parent_task_uuid IS NOT NULL;
CREATE INDEX tasks_open_children ON tasks (parent_step_uuid)
    WHERE parent_step_uuid IS NOT NULL AND completed_at IS NULL;
