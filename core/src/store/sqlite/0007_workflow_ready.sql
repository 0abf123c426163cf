-- The engine's own claim of workflow steps (SPEC §8) must not wade through every ready
-- handler step.
CREATE INDEX steps_ready_workflows ON steps (priority DESC, enqueued_at)
    WHERE state = 'enqueued' AND step_type = 'workflow';
