"""Finished work written straight to the tables, as a long history would leave it: for the tests that pin a
cost under a large history, and for the benchmarks (bench/goals.py) that measure it."""

from __future__ import annotations

from uuid import UUID

# Plain SQL: `n` completed steps of `workflow` (keys 'h<offset + i>'), each with its attempt and result, all
# reported by `agent`, in one statement.
FINISHED_STEPS_SQL = """
WITH s AS (
    INSERT INTO coordination_step (id, workflow_id, key, name, description, role, status, priority,
        workflow_priority, attempt, max_attempts, lease_ttl_s, remaining_deps, files, extra_inputs,
        final_result, outputs, error, available_at, lease_token_hash, attempts_released,
        created_at, updated_at, finished_at)
    SELECT gen_random_uuid(), %(workflow)s, 'h' || (g + %(offset)s), 'x', '', %(role)s, 'completed',
           0, 0, 1, 3, 120, 0, '[]', '{}', 'ok', '{}', '', now(), '', 0, now(), now(), now()
    FROM generate_series(1, %(n)s) g
    RETURNING id
), a AS (
    INSERT INTO coordination_attempt (id, step_id, agent_id, number, lease_token_hash,
                                      idempotency_key, started_at, expires_at, ended_at, outcome)
    SELECT gen_random_uuid(), s.id, %(agent)s, 1, '', '', now(), now(), now(), 'completed' FROM s
    RETURNING id, step_id
)
INSERT INTO coordination_result (id, attempt_id, step_id, status, final_result, outputs, error,
    retryable, model, prompt_tokens, completion_tokens, cost_usd, response, created_at)
SELECT gen_random_uuid(), a.id, a.step_id, 'completed', 'ok', '{}', '', false, 'm', 100, 20, 0.001,
       '{}', now() FROM a
"""


def write_finished_steps(cursor, *, workflow_id: UUID, agent_id: UUID, n: int, role: str, offset: int = 0) -> None:
    """Write `n` completed steps with their attempts and results (see `FINISHED_STEPS_SQL`)."""
    cursor.execute(FINISHED_STEPS_SQL, {"workflow": workflow_id, "agent": agent_id, "n": n, "role": role,
                                        "offset": offset})
