"""Leases: who holds a step, heartbeats that keep it, a hand-back, and the expiry of a dead agent's lease."""

from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.utils import timezone

from coordination import notify, rows, tracing
from coordination.events import inserted_event_published
from coordination.errors import Forbidden, StaleLease
from coordination.models import Agent, Attempt, AttemptOutcome, Event, Step, StepStatus, WorkflowStatus
from coordination.services import event_log, file_locks, lock_order, tokens
from coordination.services.lock_order import Along
from coordination.services.workflow_counters import add, new_event, settle_workflow, workflow_move

SWEEP_BATCH = 1000

# Plain SQL: many iterations in one INSERT from arrays, skipping those stored already, reporting which were new.
def insert_iterations_sql(attempt: str, *, joined: str = "") -> str:
    """SQL inserting the iterations in the array parameters `indexes`, `thoughts`, `actions` and `observations`
    for the attempt `attempt` (an SQL expression, over the relations `joined`, if any), skipping those stored
    already. The statements that store iterations (a heartbeat's, a report's) all use it."""
    source = f"{joined}, " if joined else ""
    return f"""INSERT INTO coordination_iteration (attempt_id, "index", thought, action, observation, created_at)
    SELECT {attempt}, u.i, u.t, u.a, u.o, statement_timestamp()
    FROM {source}unnest(%(indexes)s::int[], %(thoughts)s::text[], %(actions)s::text[], %(observations)s::text[])
         AS u(i, t, a, o)
    ON CONFLICT (attempt_id, "index") DO NOTHING"""


def iteration_params(iterations: list[IterationIn]) -> dict[str, list]:
    """The array parameters of `insert_iterations_sql`: one iteration per index (the last sent wins)."""
    items = list({it.index: it for it in iterations}.values())
    return {"indexes": [it.index for it in items], "thoughts": [it.thought for it in items],
            "actions": [it.action for it in items], "observations": [it.observation for it in items]}


INSERT_ITERATIONS_SQL = f"""
{insert_iterations_sql("%(attempt)s")}
RETURNING "index"
"""

# Plain SQL: the step's row lock (lock order rule 2), sent with `HEARTBEAT_SQL` (`lock_order.run_after_lock`), so
# that the heartbeat reads what was committed under that lock (a lock taken under the step meanwhile is renewed).
LOCK_STEP_SQL = "SELECT id FROM coordination_step WHERE id = %(step)s FOR NO KEY UPDATE"

# Plain SQL, a heartbeat in one statement once the step is locked: the live lease's holder on a running or paused
# workflow (paused: the lease is extended and the agent asked to stop). The step's UPDATE is the guard and
# everything below is joined to what it returned, so nothing is written when it did not apply. The workflow's
# status is read, not locked (a pause committing meanwhile reaches the agent with its next heartbeat). Then the
# step's live locks follow the lease (rule 4), the new iterations are stored (a retried heartbeat repeats some)
# and, when there were any, a `step.progress` event. No row: a stale, foreign or cancelled lease, which the
# transaction path tells apart; it runs this statement too once it has found the lease live.
HEARTBEAT_SQL = f"""
WITH step AS (
    UPDATE coordination_step s
    SET lease_expires_at = %(now)s::timestamptz + make_interval(secs => s.lease_ttl_s), updated_at = %(now)s
    FROM coordination_workflow w
    WHERE s.id = %(step)s AND s.status = 'in_progress' AND s.lease_agent_id = %(agent)s
      AND s.lease_token_hash = %(hash)s AND s.lease_expires_at > %(now)s
      AND w.id = s.workflow_id AND w.status IN ('running', 'paused')
    RETURNING s.id, s.key, s.workflow_id, s.attempt, s.lease_attempt_id, s.lease_expires_at,
              w.status = 'paused' AS paused
), renewed AS (
    UPDATE coordination_filelock l SET expires_at = step.lease_expires_at
    FROM step
    WHERE l.step_id = step.id AND l.released_at IS NULL AND l.expires_at > %(now)s
    RETURNING l.id
), added AS (
    {insert_iterations_sql("step.lease_attempt_id", joined="step")}
    RETURNING "index"
), event AS (
    INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
    SELECT step.workflow_id, 'step.progress', step.id, %(agent)s,
           jsonb_build_object('step', step.key, 'attempt', step.attempt,
                              'iterations', (SELECT jsonb_agg("index" ORDER BY "index") FROM added)),
           %(now)s
    FROM step
    WHERE EXISTS (SELECT 1 FROM added)
    RETURNING id, seq, workflow_id, data
)
SELECT step.lease_expires_at, step.paused, (SELECT count(*) FROM renewed) AS renewed,
       e.id AS event_id, e.seq AS event_seq, e.workflow_id AS event_workflow_id, e.data AS event_data
FROM step LEFT JOIN event e ON true
"""

# Plain SQL: a recursive walk down the graph in the same UPDATE that skips what it finds.
SKIP_DOWNSTREAM_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT e.step_id FROM coordination_stepdependency e WHERE e.depends_on_id = %(step)s
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
)
UPDATE coordination_step s SET status = 'skipped', finished_at = %(now)s, updated_at = %(now)s
FROM down WHERE s.id = down.id AND s.status = 'pending'
RETURNING s.key
"""


@dataclass
class IterationIn:
    index: int
    thought: str = ""
    action: str = ""
    observation: str = ""


def held_attempt(step: Step, agent: Agent, lease_token: str) -> Attempt:
    """The attempt `lease_token` belongs to, if `agent` holds it now; else the right error.

    - never held by this agent: 403;
    - held once but no longer (expired, reassigned, ended): 409 stale_lease.
    """
    hashed = tokens.token_hash(lease_token or "")
    current = step.lease_attempt
    if current is not None and hmac.compare_digest(hashed, step.lease_token_hash) and current.agent_id == agent.id:
        return current
    if not Attempt.objects.filter(step=step, agent=agent).exists():
        raise Forbidden(f"Agent {agent.name!r} does not hold step {step.key!r}: pull it first.")
    raise StaleLease(
        f"This lease on step {step.key!r} is no longer yours (the step is {step.status}); "
        "drop the work and pull another step.",
        step_status=step.status,
    )


def lease_live(step: Step, now: datetime) -> bool:
    return step.status == StepStatus.IN_PROGRESS and step.lease_expires_at is not None and step.lease_expires_at > now


def store_iterations(attempt: Attempt, iterations: list[IterationIn]) -> list[int]:
    """Store iterations not stored yet (a retried heartbeat repeats some); return the new indexes."""
    if not iterations:
        return []
    with connection.cursor() as cursor:
        cursor.execute(INSERT_ITERATIONS_SQL, {"attempt": attempt.id, **iteration_params(iterations)})
        return sorted(row["index"] for row in rows.fetch_all_named(cursor))


def end_attempt(attempt: Attempt, outcome: str, now: datetime) -> None:
    Attempt.objects.filter(id=attempt.id).update(ended_at=now, outcome=outcome)
    attempt.ended_at = now
    attempt.outcome = outcome


def backoff(charged_attempts: int) -> timedelta:
    """Delay before a step is handed out again: none after the first attempt, then exponential, capped."""
    if charged_attempts <= 1:
        return timedelta(0)
    seconds = settings.AM_RETRY_BACKOFF_BASE_S * 2 ** (charged_attempts - 2)
    return timedelta(seconds=min(seconds, settings.AM_RETRY_BACKOFF_MAX_S))


def requeue_or_fail(
    *, step: Step, now: datetime, charge: bool, error: str, final: bool = False
) -> tuple[str, list[str], timedelta]:
    """Put a step whose lease ended without success back to `ready` while attempts remain, else fail it.

    `charge=False` hands the attempt back uncharged (the step is always ready
    again); `final=True` fails the step whatever attempts remain. A failure skips
    everything pending downstream, which the caller has locked (`Along.DOWNSTREAM`).
    Returns the new status, the keys of the downstream steps skipped, and the backoff.
    """
    if not charge:
        step.attempts_released += 1
    charged = step.attempt - step.attempts_released
    step.lease_agent = None
    step.lease_expires_at = None
    step.lease_attempt = None
    if not charge or (not final and charged < step.max_attempts):
        delay = backoff(charged) if charge else timedelta(0)
        step.status = StepStatus.READY
        step.available_at = now + delay
        step.error = error
        step.save(update_fields=["status", "available_at", "error", "lease_agent", "lease_expires_at",
                                 "lease_attempt", "attempts_released", "updated_at"])
        notify.notify_ready([step.role])
        return StepStatus.READY, [], delay
    step.status = StepStatus.FAILED
    step.error = error
    step.finished_at = now
    step.save(update_fields=["status", "error", "finished_at", "lease_agent", "lease_expires_at",
                             "lease_attempt", "attempts_released", "updated_at"])
    with connection.cursor() as cursor:
        cursor.execute(SKIP_DOWNSTREAM_SQL, {"step": step.id, "now": now})
        skipped = [row["key"] for row in rows.fetch_all_named(cursor)]
    return StepStatus.FAILED, skipped, timedelta(0)


def step_heartbeat(*, step_id: UUID, agent: Agent, lease_token: str,
                   iterations: list[IterationIn] | None = None) -> dict[str, Any]:
    """Extend a live lease (and its step's locks); store new reasoning iterations.

    `cancel` is true when the workflow was cancelled or paused: the agent should stop.
    A live lease's heartbeat is one round trip (`HEARTBEAT_SQL` after the step's
    lock); the rest, which it leaves untouched, takes the transaction path, which
    tells them apart.
    """
    now = timezone.now()
    params = _heartbeat_params(step_id=step_id, agent=agent, lease_token=lease_token, iterations=iterations or [],
                               now=now)
    found = lock_order.unless_conflict(functools.partial(
        lock_order.run_after_lock, LOCK_STEP_SQL, {"step": step_id}, HEARTBEAT_SQL, params))
    if found:
        return _heartbeat_answer(found[0], step_id=step_id, agent=agent, now=now)
    return _step_heartbeat(step_id=step_id, agent=agent, lease_token=lease_token, iterations=iterations or [])


def _heartbeat_params(*, step_id: UUID, agent: Agent, lease_token: str, iterations: list[IterationIn],
                      now: datetime) -> dict[str, Any]:
    return {"now": now, "step": step_id, "agent": agent.id, "hash": tokens.token_hash(lease_token or ""),
            **iteration_params(iterations)}


def _heartbeat_answer(row: dict[str, Any], *, step_id: UUID, agent: Agent, now: datetime) -> dict[str, Any]:
    """The answer to a heartbeat `HEARTBEAT_SQL` applied; its event published once its transaction commits."""
    if row["event_id"] is not None:
        inserted_event_published(Event(
            id=row["event_id"], workflow_id=row["event_workflow_id"], seq=row["event_seq"], kind="step.progress",
            step_id=step_id, agent_id=agent.id, data=rows.json_value(row["event_data"]), at=now))
    return {"expires_at": row["lease_expires_at"], "cancel": row["paused"]}


@lock_order.retrying
def _step_heartbeat(*, step_id: UUID, agent: Agent, lease_token: str,
                    iterations: list[IterationIn]) -> dict[str, Any]:
    """What `HEARTBEAT_SQL` left untouched, under the step's lock: the right refusal, or `cancel` for a cancelled
    step or workflow; a lease found live (the statement met a conflict, or the lease changed in between) gets
    the same statement."""
    now = timezone.now()
    step = lock_order.locked_step(step_id)
    held_attempt(step, agent, lease_token)
    if step.status == StepStatus.CANCELLED or step.workflow.status not in (WorkflowStatus.RUNNING,
                                                                          WorkflowStatus.PAUSED):
        return {"expires_at": now, "cancel": True}  # cancelled (or finished): the agent stops
    if not lease_live(step, now):
        raise StaleLease(
            f"The lease on step {step.key!r} expired at {step.lease_expires_at:%Y-%m-%dT%H:%M:%SZ}; "
            "drop the work and pull another step.",
            step_status=step.status,
        )
    with connection.cursor() as cursor:
        cursor.execute(HEARTBEAT_SQL, _heartbeat_params(step_id=step_id, agent=agent, lease_token=lease_token,
                                                        iterations=iterations, now=now))
        row = rows.fetch_named(cursor)
    if row is None:
        raise AssertionError(f"step {step_id}'s live lease changed under its lock")
    return _heartbeat_answer(row, step_id=step_id, agent=agent, now=now)


@lock_order.retrying
def step_release(*, step_id: UUID, agent: Agent, lease_token: str) -> dict[str, Any]:
    """Hand a held step back without charging an attempt (a worker shutting down, a paused workflow)."""
    now = timezone.now()
    step = lock_order.locked_step(step_id)
    attempt = held_attempt(step, agent, lease_token)
    if not lease_live(step, now):
        raise StaleLease(f"The lease on step {step.key!r} has already ended.", step_status=step.status)
    end_attempt(attempt, AttemptOutcome.RELEASED, now)
    tracing.attempt_ended(step=step, attempt=attempt, agent_name=agent.name)
    new_status, _, _ = requeue_or_fail(step=step, now=now, charge=False, error="")
    file_locks.lock_release_for_step(step=step, reason="released")
    workflow_move(step.workflow_id, {StepStatus.IN_PROGRESS: -1, new_status: +1})
    event_log.event_record_many([new_event("step.handed_back", workflow_id=step.workflow_id,
                                           step=step, agent_id=agent.id,
                                           data={"agent": agent.name, "attempt": attempt.number})])
    return {"step_id": str(step.id), "status": step.status}


@lock_order.retrying
def lease_expire(*, step_id: UUID) -> str | None:
    """End a lease that ran out: back to `ready` after a backoff while attempts remain, else `failed`.

    Re-checked under the row lock, so a heartbeat that arrived in time wins. In
    a paused workflow the attempt is not charged. Returns the new status, or
    None when there was nothing to expire.
    """
    now = timezone.now()
    step = lock_order.locked_step(step_id, along=Along.DOWNSTREAM)
    if step.status != StepStatus.IN_PROGRESS or step.lease_expires_at is None or step.lease_expires_at > now:
        return None
    attempt = step.lease_attempt
    agent = Agent.objects.filter(id=step.lease_agent_id).first() if step.lease_agent_id else None
    if attempt is not None:
        end_attempt(attempt, AttemptOutcome.EXPIRED, now)
        tracing.attempt_ended(step=step, attempt=attempt, agent_name=agent.name if agent else None)
    paused = step.workflow.status == WorkflowStatus.PAUSED
    new_status, skipped, delay = requeue_or_fail(
        step=step, now=now, charge=not paused,
        error="" if paused else f"The lease of attempt {step.attempt} expired (no heartbeat).",
    )
    file_locks.lock_release_for_step(step=step, reason="lease_expired")
    moves = {StepStatus.IN_PROGRESS: -1}
    add(moves, new_status, 1)
    add(moves, StepStatus.PENDING, -len(skipped))
    add(moves, StepStatus.SKIPPED, len(skipped))
    snapshot = workflow_move(step.workflow_id, moves)
    events = [new_event("step.lease_expired", workflow_id=step.workflow_id, step=step,
                        agent_id=agent.id if agent else None,
                        data={"agent": agent.name if agent else None, "attempt": step.attempt, "status": new_status,
                              "backoff_s": delay.total_seconds()})]
    if skipped:
        events.append(new_event("steps.skipped", workflow_id=step.workflow_id,
                                data={"steps": skipped, "after": step.key}))
    event_log.event_record_many(events)
    settle_workflow(snapshot)
    return new_status


def leases_sweep(*, limit: int = SWEEP_BATCH) -> int:
    """Expire every lease past its end (Celery beat); each in its own short transaction."""
    now = timezone.now()
    ids = list(
        Step.objects.filter(status=StepStatus.IN_PROGRESS, lease_expires_at__lte=now)
        .order_by("lease_expires_at")
        .values_list("id", flat=True)[:limit]
    )
    return sum(1 for step_id in ids if lease_expire(step_id=step_id) is not None)
