"""The workflow row: its per-status step counters, its spend, its event sequence, and when it settles.

Every change of a step's status moves the counters in the same transaction, so a
workflow's status costs one row read whatever its size. The rule for when a
running workflow has finished (`settled_status`) is here once; the report's
one-statement completion uses its SQL twin, `SETTLED_STATUS_SQL`, which a test
compares with the Python for every combination of counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.utils import timezone

from coordination import rows, tracing
from coordination.errors import NotFound
from coordination.models import STEP_COUNTER_FIELDS, Agent, AuditStatus, Event, Step, StepStatus, Workflow, WorkflowStatus
from coordination.services import background, event_log

COUNTER_COLUMNS = list(STEP_COUNTER_FIELDS.values())

# Plain SQL: deltas, spend and sequence numbers in one UPDATE ... RETURNING (the ORM needs a second
# round trip to read the row back). Every counter is a parameter (0 when it does not move).
WORKFLOW_MOVE_SQL = f"""
UPDATE coordination_workflow
SET event_seq = event_seq + %(events)s, updated_at = statement_timestamp(),
    {", ".join(f"{column} = {column} + %({column})s" for column in COUNTER_COLUMNS)},
    spent_usd = spent_usd + %(spent_usd)s, spent_tokens = spent_tokens + %(spent_tokens)s
WHERE id = %(workflow)s
RETURNING event_seq, status, total_steps, spent_usd, spent_tokens, budget_usd, budget_tokens,
          {", ".join(COUNTER_COLUMNS)}
"""

# The status a workflow settles to after a change, over a row `w` with its counters and spend:
# `settled_status` followed by the budget pause of `workflow_after`. Used inside the report's completion
# statement; `test_settled_status` pins it to the Python rule.
SETTLED_STATUS_SQL = """CASE
    WHEN w.status NOT IN ('running', 'paused') THEN w.status
    WHEN w.n_completed = w.total_steps AND w.total_steps > 0 THEN 'completed'
    WHEN w.n_ready = 0 AND w.n_in_progress = 0 THEN 'failed'
    WHEN w.status = 'running' AND ((w.budget_usd IS NOT NULL AND w.spent_usd >= w.budget_usd)
                                   OR (w.budget_tokens IS NOT NULL AND w.spent_tokens >= w.budget_tokens))
        THEN 'paused'
    ELSE w.status END"""


@dataclass
class WorkflowSnapshot:
    """The workflow row as one counter update left it."""

    id: UUID
    status: str
    total_steps: int
    counts: dict[str, int]
    first_seq: int
    last_seq: int
    spent_usd: Decimal = Decimal(0)
    spent_tokens: int = 0
    budget_usd: Decimal | None = None
    budget_tokens: int | None = None

    @classmethod
    def from_row(cls, workflow_id: UUID, row: dict[str, Any], *, events: int) -> WorkflowSnapshot:
        """From a row holding the columns `WORKFLOW_MOVE_SQL` returns, after allocating `events` numbers."""
        return cls(
            id=workflow_id,
            status=row["status"],
            total_steps=row["total_steps"],
            counts={status: row[column] for status, column in STEP_COUNTER_FIELDS.items()},
            first_seq=row["event_seq"] - events + 1,
            last_seq=row["event_seq"],
            spent_usd=row["spent_usd"],
            spent_tokens=row["spent_tokens"],
            budget_usd=row["budget_usd"],
            budget_tokens=row["budget_tokens"],
        )

    @classmethod
    def of(cls, workflow: Workflow) -> WorkflowSnapshot:
        """The snapshot of a workflow row as read (no event numbers allocated)."""
        return cls(
            id=workflow.id,
            status=workflow.status,
            total_steps=workflow.total_steps,
            counts={status: getattr(workflow, column) for status, column in STEP_COUNTER_FIELDS.items()},
            first_seq=workflow.event_seq + 1,
            last_seq=workflow.event_seq,
            spent_usd=workflow.spent_usd,
            spent_tokens=workflow.spent_tokens,
            budget_usd=workflow.budget_usd,
            budget_tokens=workflow.budget_tokens,
        )

    def budget_exceeded(self) -> str:
        """Why the spend has reached the budget, or '' while it has not."""
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            return f"budget: spent ${self.spent_usd:.4f} of ${self.budget_usd:.4f}"
        if self.budget_tokens is not None and self.spent_tokens >= self.budget_tokens:
            return f"budget: used {self.spent_tokens} of {self.budget_tokens} tokens"
        return ""

    def seqs(self):
        return iter(range(self.first_seq, self.last_seq + 1))

    def live_steps(self) -> int:
        return sum(self.counts[status] for status in (StepStatus.PENDING, StepStatus.READY, StepStatus.IN_PROGRESS))


def add(moves: dict[str, int], status: str, delta: int) -> None:
    """Add `delta` steps of `status` to a set of counter moves."""
    moves[status] = moves.get(status, 0) + delta


def workflow_move(
    workflow_id: UUID,
    moves: dict[str, int],
    *,
    events: int = 1,
    spent_usd: Decimal = Decimal(0),
    spent_tokens: int = 0,
) -> WorkflowSnapshot:
    """Apply step-count deltas, add spend and allocate `events` sequence numbers, in one statement.

    The UPDATE takes the workflow row lock (last in the lock order); its cost does
    not depend on the number of steps.
    """
    params: dict[str, Any] = {column: 0 for column in COUNTER_COLUMNS}
    for status, delta in moves.items():
        params[STEP_COUNTER_FIELDS[status]] += delta
    params.update(events=events, spent_usd=spent_usd, spent_tokens=spent_tokens, workflow=workflow_id)
    with connection.cursor() as cursor:
        cursor.execute(WORKFLOW_MOVE_SQL, params)
        row = rows.fetch_named(cursor)
    if row is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return WorkflowSnapshot.from_row(workflow_id, row, events=events)


def new_event(seqs, kind: str, *, workflow_id: UUID, step: Step | None = None,
              agent_id: UUID | None = None, data: dict[str, Any] | None = None) -> Event:
    """An unsaved event numbered from `seqs` (a snapshot's allocated sequence numbers)."""
    return Event(
        workflow_id=workflow_id,
        seq=next(seqs),
        kind=kind,
        step_id=step.id if step else None,
        agent_id=agent_id,
        data={**({"step": step.key} if step else {}), **(data or {})},
    )


def actor(user: AbstractBaseUser | None, agent: Agent | None) -> dict[str, str]:
    """Who made a change, for an event's data."""
    if agent is not None:
        return {"by_agent": agent.name}
    if user is not None and user.is_authenticated:
        return {"by_user": user.get_username()}
    return {"by": "system"}


def settled_status(snapshot: WorkflowSnapshot) -> str:
    """The status a running or paused workflow settles to after a change: finished when nothing more can run.

    All steps completed: `completed`. Nothing ready or in progress and some step
    not completed (failed, skipped, cancelled, or pending behind one): `failed`.
    """
    if snapshot.status not in (WorkflowStatus.RUNNING, WorkflowStatus.PAUSED):
        return snapshot.status
    counts = snapshot.counts
    if counts[StepStatus.COMPLETED] == snapshot.total_steps and snapshot.total_steps:
        return WorkflowStatus.COMPLETED
    if counts[StepStatus.READY] == 0 and counts[StepStatus.IN_PROGRESS] == 0:
        return WorkflowStatus.FAILED
    return snapshot.status


def workflow_after(snapshot: WorkflowSnapshot) -> tuple[str, str]:
    """The workflow's status once a step has finished (settled, or paused over budget), and why it pauses."""
    status = settled_status(snapshot)
    over_budget = snapshot.budget_exceeded()
    if over_budget and status == WorkflowStatus.RUNNING:
        return WorkflowStatus.PAUSED, over_budget
    return status, ""


def settle_workflow(snapshot: WorkflowSnapshot) -> str:
    """Finish a running or paused workflow when nothing more can run (see `settled_status`); return its status."""
    new_status = settled_status(snapshot)
    if new_status == snapshot.status:
        return new_status
    counts = snapshot.counts
    now = timezone.now()
    reason = ""
    if new_status == WorkflowStatus.FAILED:
        reason = (
            f"{counts[StepStatus.FAILED]} step(s) failed, {counts[StepStatus.SKIPPED]} skipped, "
            f"{counts[StepStatus.CANCELLED]} cancelled; nothing else can run."
        )
    audit = {"audit_status": AuditStatus.PENDING} if new_status == WorkflowStatus.COMPLETED else {}
    Workflow.objects.filter(id=snapshot.id).update(
        status=new_status, finished_at=now, updated_at=now, failure_reason=reason, paused_reason="", **audit
    )
    event_log.event_record(kind=f"workflow.{new_status}", workflow_id=snapshot.id,
                           data={"status": new_status, "counts": counts, **({"reason": reason} if reason else {})})
    tracing.workflow_settled(workflow_id=snapshot.id)
    if audit:
        background.enqueue_after_commit("coordination.tasks.audit_workflow", snapshot.id)
    return new_status
