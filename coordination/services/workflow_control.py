"""People (and submitting agents) steering workflows: cancel, pause, resume, retry a step, edit, delete."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import OperationalError, connection
from django.db.models import Count, Q
from django.utils import timezone

from coordination import notify, rows, tracing
from coordination.errors import InvalidRequest, InvalidState, NotFound, ServiceError
from coordination.models import (
    TERMINAL_WORKFLOW_STATUSES,
    Agent,
    Attempt,
    AttemptOutcome,
    Step,
    StepStatus,
    Workflow,
    WorkflowStatus,
)
from coordination.services import event_log, file_locks, lock_order
from coordination.services.lock_order import Along, RetryTransaction
from coordination.services.workflow_counters import (
    actor,
    add,
    new_event,
    settle_workflow,
    workflow_after,
    workflow_move,
)

logger = logging.getLogger(__name__)

MAX_NAME = 200
PRIORITY_MAX = 1_000_000

# Plain SQL: cancel the locked steps and learn each one's former status in one round trip.
CANCEL_STEPS_SQL = """
WITH old AS (
    SELECT id, status FROM coordination_step WHERE id = ANY(%(steps)s::uuid[])
)
UPDATE coordination_step s
SET status = 'cancelled', finished_at = %(now)s, updated_at = %(now)s, lease_expires_at = NULL
FROM old WHERE s.id = old.id
RETURNING old.status AS old_status, s.id
"""

# Plain SQL: a recursive walk down the graph in the same UPDATE that reopens what it finds. Each reopened step
# counts its dependencies not completed anew: a completion while it was skipped did not count down for it (it
# only counts down pending steps), and the retried step upstream keeps at least one open.
UNSKIP_DOWNSTREAM_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT e.step_id FROM coordination_stepdependency e WHERE e.depends_on_id = %(step)s
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
)
UPDATE coordination_step s SET status = 'pending', finished_at = NULL, updated_at = %(now)s,
    remaining_deps = (SELECT count(*) FROM coordination_stepdependency e JOIN coordination_step d ON d.id = e.depends_on_id
                      WHERE e.step_id = s.id AND d.status <> 'completed')
FROM down WHERE s.id = down.id AND s.status = 'skipped'
RETURNING s.key
"""


def _workflow(workflow_id: UUID) -> Workflow:
    workflow = Workflow.objects.filter(id=workflow_id).first()
    if workflow is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return workflow


@lock_order.retrying
def workflow_cancel(*, workflow_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Workflow:
    """Cancel a workflow: every step not finished is cancelled; running agents learn it from their heartbeat.

    Steps are locked before the workflow (the lock order). If a step came back to
    life between the two (a retry that committed in between), the counters say so
    and the whole transaction runs again.
    """
    now = timezone.now()
    workflow = _workflow(workflow_id)
    if workflow.status in TERMINAL_WORKFLOW_STATUSES:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status} already; "
                           "only a live workflow can be cancelled.")
    live = lock_order.lock_live_steps(workflow_id)
    step_ids = [row["id"] for row in live]
    with connection.cursor() as cursor:
        cursor.execute(CANCEL_STEPS_SQL, {"steps": step_ids, "now": now})
        cancelled = rows.fetch_all_named(cursor)
    moves: dict[str, int] = {StepStatus.CANCELLED: len(cancelled)}
    for row in cancelled:
        add(moves, row["old_status"], -1)
    tracing.attempts_cancelled(step_ids=step_ids, ended_at=now)
    Attempt.objects.filter(step_id__in=step_ids, ended_at__isnull=True).update(
        ended_at=now, outcome=AttemptOutcome.CANCELLED)
    file_locks.lock_release_for_steps(step_ids=step_ids, reason="cancelled")
    snapshot = workflow_move(workflow_id, moves)
    if snapshot.status in TERMINAL_WORKFLOW_STATUSES or snapshot.live_steps():
        raise RetryTransaction(f"workflow {workflow_id} changed while its steps were being cancelled")
    Workflow.objects.filter(id=workflow_id).update(status=WorkflowStatus.CANCELLED, finished_at=now, paused_reason="")
    tracing.workflow_settled(workflow_id=workflow_id)
    event_log.event_record_many([new_event("workflow.cancelled", workflow_id=workflow_id,
                                           agent_id=agent.id if agent else None,
                                           data={"cancelled_steps": len(cancelled), **actor(user, agent)})])
    return _workflow(workflow_id)


@lock_order.retrying
def workflow_pause(*, workflow_id: UUID, reason: str = "", user: AbstractBaseUser | None = None,
                   agent: Agent | None = None) -> Workflow:
    """Hand out no new steps; running agents are asked to stop through their heartbeat."""
    workflow = lock_order.lock_workflow(workflow_id)
    if workflow.status == WorkflowStatus.PAUSED:
        return workflow
    if workflow.status != WorkflowStatus.RUNNING:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}; only a running workflow can be paused.")
    who = actor(user, agent)
    workflow.status = WorkflowStatus.PAUSED
    workflow.paused_reason = reason or f"paused by {next(iter(who.values()))}"
    workflow.save(update_fields=["status", "paused_reason", "updated_at"])
    event_log.event_record(kind="workflow.paused", workflow_id=workflow.id, agent_id=agent.id if agent else None,
                           data={"reason": workflow.paused_reason, **who})
    return workflow


@lock_order.retrying
def workflow_resume(*, workflow_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Workflow:
    workflow = lock_order.lock_workflow(workflow_id)
    if workflow.status == WorkflowStatus.RUNNING:
        return workflow
    if workflow.status != WorkflowStatus.PAUSED:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}; only a paused workflow can be resumed.")
    workflow.status = WorkflowStatus.RUNNING
    workflow.paused_reason = ""
    workflow.save(update_fields=["status", "paused_reason", "updated_at"])
    notify.notify_ready_counts(dict(
        Step.objects.filter(workflow=workflow, status=StepStatus.READY).order_by().values("role")
        .annotate(n=Count("id")).values_list("role", "n")
    ))
    event_log.event_record(kind="workflow.resumed", workflow_id=workflow.id, agent_id=agent.id if agent else None,
                           data=actor(user, agent))
    return workflow


@lock_order.retrying
def step_retry(*, step_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Step:
    """A failed or cancelled step back to `ready` with fresh attempts; its skipped dependents back to `pending`."""
    now = timezone.now()
    step = lock_order.locked_step(step_id, along=Along.DOWNSTREAM)
    if step.status not in (StepStatus.FAILED, StepStatus.CANCELLED):
        raise InvalidState(f"Step {step.key!r} is {step.status}; only a failed or cancelled step can be retried.")
    old_status = step.status
    step.status = StepStatus.READY if step.remaining_deps == 0 else StepStatus.PENDING
    step.attempts_released = step.attempt  # a fresh set of attempts
    step.available_at = now if step.status == StepStatus.READY else None
    step.finished_at = None
    step.error = ""
    step.save(update_fields=["status", "attempts_released", "available_at", "finished_at", "error", "updated_at"])
    with connection.cursor() as cursor:
        cursor.execute(UNSKIP_DOWNSTREAM_SQL, {"step": step.id, "now": now})
        unskipped = [row["key"] for row in rows.fetch_all_named(cursor)]
    moves: dict[str, int] = {}
    add(moves, old_status, -1)
    add(moves, step.status, 1)
    add(moves, StepStatus.SKIPPED, -len(unskipped))
    add(moves, StepStatus.PENDING, len(unskipped))
    snapshot = workflow_move(step.workflow_id, moves)
    if snapshot.status in TERMINAL_WORKFLOW_STATUSES:
        Workflow.objects.filter(id=step.workflow_id).update(status=WorkflowStatus.RUNNING, finished_at=None,
                                                            failure_reason="")
    if step.status == StepStatus.READY:
        notify.notify_ready([step.role])
    event_log.event_record_many([new_event("step.retried", workflow_id=step.workflow_id, step=step,
                                           agent_id=agent.id if agent else None,
                                           data={"from": old_status, "unskipped": unskipped, **actor(user, agent)})])
    step.refresh_from_db()
    return step


@lock_order.retrying
def workflow_edit(*, workflow_id: UUID, name: str, priority: int, budget_usd: Decimal | None,
                  budget_tokens: int | None, max_rework_rounds: int, user: AbstractBaseUser | None = None) -> Workflow:
    """Change what a person may change of a workflow: its name, priority, budget and rework rounds.

    A new priority reaches every step's place in the ready queue in the same
    transaction; a budget raised above the spend does not resume a workflow it
    paused (resume it), a budget lowered below it pauses at the next report.
    """
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidRequest(f"A workflow name must be 1 to {MAX_NAME} characters.")
    if not isinstance(priority, int) or not -PRIORITY_MAX <= priority <= PRIORITY_MAX:
        raise InvalidRequest(f"priority={priority!r} is out of range -{PRIORITY_MAX}..{PRIORITY_MAX}.")
    if budget_usd is not None and budget_usd <= 0:
        raise InvalidRequest("A budget in USD must be above 0; leave it empty for none.")
    if budget_tokens is not None and budget_tokens <= 0:
        raise InvalidRequest("A budget in tokens must be above 0; leave it empty for none.")
    if not 0 <= max_rework_rounds <= 10:
        raise InvalidRequest(f"max_rework_rounds={max_rework_rounds} is out of range 0..10.")
    current = _workflow(workflow_id)
    new: dict[str, Any] = {"name": name, "priority": priority, "budget_usd": budget_usd,
                           "budget_tokens": budget_tokens, "max_rework_rounds": max_rework_rounds}
    changed = {field: value for field, value in new.items() if getattr(current, field) != value}
    if not changed:
        return current
    if "priority" in changed:
        lock_order.lock_all_steps(workflow_id)
        Step.objects.filter(workflow_id=workflow_id).update(workflow_priority=priority)
    workflow = lock_order.lock_workflow(workflow_id)
    for field, value in changed.items():
        setattr(workflow, field, value)
    workflow.save(update_fields=[*changed, "updated_at"])
    event_log.event_record(kind="workflow.edited", workflow_id=workflow.id,
                           data={"changed": {k: str(v) if isinstance(v, Decimal) else v for k, v in changed.items()},
                                 **actor(user, None)})
    return workflow


@lock_order.retrying
def workflow_delete(*, workflow_id: UUID, user: AbstractBaseUser | None = None) -> None:
    """Delete a finished workflow with its steps, attempts, results, audits and events.

    A live one is refused: cancel it first, so its agents and locks are let go
    through the usual path. The deletion itself is recorded in the global log.
    """
    if _workflow(workflow_id).status not in TERMINAL_WORKFLOW_STATUSES:
        raise InvalidState(f"Workflow {_workflow(workflow_id).name!r} is live; cancel it before deleting it.")
    lock_order.lock_all_steps(workflow_id)
    workflow = lock_order.lock_workflow(workflow_id, deleting=True)
    if workflow.status not in TERMINAL_WORKFLOW_STATUSES:
        raise RetryTransaction(f"workflow {workflow_id} came back to life while it was being deleted")
    data = {"workflow_id": str(workflow.id), "name": workflow.name, "project": workflow.project.name,
            "status": workflow.status, "total_steps": workflow.total_steps, **actor(user, None)}
    workflow.delete()
    event_log.event_record(kind="workflow.deleted", data=data)


@lock_order.retrying
def workflow_settle(*, workflow_id: UUID) -> str:
    """Finish a workflow nothing more can run in, or pause it over its budget, as its counters say now.

    A report applied on its own (`reports.step_report`'s one statement) settles
    its workflow here, in a transaction of its own right after; the decision is
    taken again under the workflow's lock, from its row with every committed delta
    folded in, so a change that committed in between (another report, a rework)
    is taken into account, and settling twice is harmless. Returns the workflow's
    status.
    """
    snapshot = workflow_move(workflow_id, {})  # locks the row, folds its deltas in, reads it
    status, pause_reason = workflow_after(snapshot)
    if status == snapshot.status:
        return status
    if pause_reason:
        return workflow_pause(workflow_id=workflow_id, reason=pause_reason).status
    return settle_workflow(snapshot)


# Running or paused workflows whose counters say nothing more can run (nothing ready or in progress). Over-budget
# workflows are not swept: the next report pauses one, and a person may have resumed it on purpose. It reads the
# rows' own counters: the sweep folds the deltas in just before (`tasks.sweep_expired`), and `workflow_settle`
# decides again from the live counts.
_UNSETTLED = Q(status__in=[WorkflowStatus.RUNNING, WorkflowStatus.PAUSED], n_ready=0, n_in_progress=0)


def workflows_settle_sweep(*, limit: int = 100) -> int:
    """Settle workflows a report left unsettled (its process ended, or the database refused, between its
    statement and `workflow_settle`), each in its own transaction (Celery beat, with the lease sweep).
    Returns how many changed status; one that cannot be settled now is logged and left for the next sweep."""
    changed = 0
    for workflow_id, status in Workflow.objects.filter(_UNSETTLED).order_by("updated_at").values_list(
            "id", "status")[:limit]:
        try:
            changed += workflow_settle(workflow_id=workflow_id) != status
        except (ServiceError, OperationalError):
            logger.warning("Could not settle workflow %s now; the next sweep tries again.", workflow_id,
                           exc_info=True)
    return changed
