"""The workflow row: its per-status step counters, its spend, and when it settles.

A workflow's status costs one row read whatever its size: every change of a
step's status moves the counters in the same transaction. The hot paths (a pull,
a completed report: `pull`, `reports`) never lock the workflow row, so that many
agents on one workflow do not take turns on it: they insert a `WorkflowDelta`
instead. The rest (failures, retries, cancels, ...) moves the row itself under
its lock (`workflow_move`), folding the deltas in as it goes; `workflow_fold`
folds them for anyone else (the sweep, and now and then a report). Reading a
workflow through the ORM adds its deltas (`models.WorkflowQuerySet`).

The rule for when a running workflow has finished (`settled_status`) is here
once; the report's one-statement completion decides what to answer by probing
the steps themselves (`reports`), and the workflow settles after its commit
(`workflow_control.workflow_settle`), where every committed delta is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from coordination import rows, tracing
from coordination.errors import NotFound
from coordination.models import (LIVE_FIELDS, STEP_COUNTER_FIELDS, Agent, AuditStatus, Event, Step, StepStatus,
                                 Workflow, WorkflowStatus)
from coordination.services import background, event_log, lock_order

COUNTER_COLUMNS = list(STEP_COUNTER_FIELDS.values())

# A CTE `folded`: the deltas of the workflows in CTE `locked` (their rows locked by it), deleted and summed per
# workflow. A delta is deleted by the statement that adds it to its row, under that row's lock, so it is counted
# once: a fold that waited for the lock finds the rows another fold deleted gone, and sums only its own.
_FOLDED_CTE = """
folded_rows AS (
    DELETE FROM coordination_workflowdelta d USING locked WHERE d.workflow_id = locked.id
    RETURNING d.workflow_id, {delta_columns}
), folded AS (
    SELECT locked.id AS workflow_id, {delta_sums}
    FROM locked LEFT JOIN folded_rows f ON f.workflow_id = locked.id GROUP BY locked.id
)""".format(delta_columns=", ".join(f"d.{field}" for field in LIVE_FIELDS),
            delta_sums=", ".join(f"coalesce(sum(f.{field}), 0){'::bigint' if field == 'spent_tokens' else ''} AS {field}"
                                 for field in LIVE_FIELDS))

# Plain SQL: the workflow row's lock, taken by a statement of its own, sent together with the statement that moves
# the row (`lock_order.run_after_lock`). An UPDATE checks the row's constraints on the new version it computes from
# the version its snapshot saw, before it finds that row locked or changed by another transaction and waits (only
# then does it apply its SET again to the newest version). Computed from a version that a concurrent move or fold
# has since changed, a move could trip `workflow_counters_non_negative` although the row it would write satisfies
# it: a step taken back (in_progress -1) whose lease the snapshot's version did not count yet. A statement that
# starts with the lock held reads the row as it is (READ COMMITTED: a snapshot per statement).
LOCK_WORKFLOW_SQL = "SELECT id FROM coordination_workflow WHERE id = %(workflow)s FOR NO KEY UPDATE"
LOCK_FREE_WORKFLOWS_SQL = """
SELECT id FROM coordination_workflow WHERE id = ANY(%(workflows)s::uuid[]) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
"""

# Plain SQL: fold the row's deltas in, apply a change's moves and spend, and read the live row back, in one
# statement (the ORM needs several round trips), run with the row locked (`LOCK_WORKFLOW_SQL`). Every counter is
# a parameter (0 when it does not move).
WORKFLOW_MOVE_SQL = f"""
WITH locked AS (
    SELECT id FROM coordination_workflow WHERE id = %(workflow)s FOR NO KEY UPDATE
), {_FOLDED_CTE.strip()}
UPDATE coordination_workflow w
SET updated_at = statement_timestamp(),
    {", ".join(f"{column} = w.{column} + f.{column} + %({column})s" for column in COUNTER_COLUMNS)},
    spent_usd = w.spent_usd + f.spent_usd + %(spent_usd)s, spent_tokens = w.spent_tokens + f.spent_tokens + %(spent_tokens)s
FROM folded f
WHERE w.id = f.workflow_id
RETURNING w.status, w.total_steps, w.spent_usd, w.spent_tokens, w.budget_usd, w.budget_tokens,
          {", ".join(f"w.{column}" for column in COUNTER_COLUMNS)}
"""

# Plain SQL: fold the deltas of workflows whose rows `LOCK_FREE_WORKFLOWS_SQL` has locked (skipping those another
# transaction holds: a fold never waits).
WORKFLOW_FOLD_SQL = f"""
WITH locked AS (
    SELECT id FROM coordination_workflow WHERE id = ANY(%(workflows)s::uuid[]) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
), {_FOLDED_CTE.strip()}
UPDATE coordination_workflow w
SET {", ".join(f"{field} = w.{field} + f.{field}" for field in LIVE_FIELDS)}, updated_at = statement_timestamp()
FROM folded f
WHERE w.id = f.workflow_id
RETURNING w.id
"""

# Plain SQL: the workflows that have deltas, oldest first.
WORKFLOWS_WITH_DELTAS_SQL = """
SELECT workflow_id FROM coordination_workflowdelta GROUP BY workflow_id ORDER BY min(id) LIMIT %(limit)s
"""

# The status a workflow settles to after a change, over a row `w` with its counters and spend:
# `settled_status` followed by the budget pause of `workflow_after`. `test_settled_status` pins it to the Python.
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
    spent_usd: Decimal = Decimal(0)
    spent_tokens: int = 0
    budget_usd: Decimal | None = None
    budget_tokens: int | None = None

    @classmethod
    def from_row(cls, workflow_id: UUID, row: dict[str, Any]) -> WorkflowSnapshot:
        """From a row holding the columns `WORKFLOW_MOVE_SQL` returns."""
        return cls(
            id=workflow_id,
            status=row["status"],
            total_steps=row["total_steps"],
            counts={status: row[column] for status, column in STEP_COUNTER_FIELDS.items()},
            spent_usd=row["spent_usd"],
            spent_tokens=row["spent_tokens"],
            budget_usd=row["budget_usd"],
            budget_tokens=row["budget_tokens"],
        )

    @classmethod
    def of(cls, workflow: Workflow) -> WorkflowSnapshot:
        """The snapshot of a workflow as read (its deltas added)."""
        return cls(
            id=workflow.id,
            status=workflow.status,
            total_steps=workflow.total_steps,
            counts={status: getattr(workflow, column) for status, column in STEP_COUNTER_FIELDS.items()},
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

    def live_steps(self) -> int:
        return sum(self.counts[status] for status in (StepStatus.PENDING, StepStatus.READY, StepStatus.IN_PROGRESS))


def add(moves: dict[str, int], status: str, delta: int) -> None:
    """Add `delta` steps of `status` to a set of counter moves."""
    moves[status] = moves.get(status, 0) + delta


def workflow_move(
    workflow_id: UUID,
    moves: dict[str, int],
    *,
    spent_usd: Decimal = Decimal(0),
    spent_tokens: int = 0,
) -> WorkflowSnapshot:
    """Apply step-count deltas and add spend to the workflow row, folding its deltas in, in one round trip.

    It takes the workflow row's lock (late in the lock order) in a statement of its
    own, then its deltas'; its cost does not depend on the number of steps. The
    snapshot it returns counts every change committed before the lock, and this one.
    """
    params: dict[str, Any] = {column: 0 for column in COUNTER_COLUMNS}
    for status, delta in moves.items():
        params[STEP_COUNTER_FIELDS[status]] += delta
    params.update(spent_usd=spent_usd, spent_tokens=spent_tokens, workflow=workflow_id)
    found = lock_order.run_after_lock(LOCK_WORKFLOW_SQL, {"workflow": workflow_id}, WORKFLOW_MOVE_SQL, params)
    if not found:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return WorkflowSnapshot.from_row(workflow_id, found[0])


def workflow_fold(workflow_ids: list[UUID]) -> int:
    """Fold the deltas of these workflows into their rows, skipping any row another transaction holds (it
    never waits). Returns how many rows it folded. Reads stay exact either way; folding keeps them cheap.
    A transaction of two round trips: the rows are held while the fold's statement runs, a `workflow_move`
    of one of them waits that long (1 in 32 fast reports folds, and the sweep)."""
    if not workflow_ids:
        return 0
    # Two round trips: the fold runs on the rows the first statement locked, and only on those (a row freed in
    # between would be locked by the fold's own statement, in a snapshot taken before: `LOCK_WORKFLOW_SQL`).
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        cursor.execute(LOCK_FREE_WORKFLOWS_SQL, {"workflows": list(workflow_ids)})
        held = [row[0] for row in cursor.fetchall()]
        if not held:
            return 0
        cursor.execute(WORKFLOW_FOLD_SQL, {"workflows": held})
        return len(cursor.fetchall())


def workflows_fold_sweep(*, limit: int = 1000, rounds: int = 10) -> int:
    """Fold the deltas of the workflows that have some (Celery beat, with the lease sweep), `limit` workflows a
    statement, at most `rounds` statements: under a steady load new deltas keep coming, and the next sweep
    goes on where this one stopped (oldest deltas first). Returns how many workflows it folded."""
    folded = 0
    for _ in range(rounds):
        with connection.cursor() as cursor:
            cursor.execute(WORKFLOWS_WITH_DELTAS_SQL, {"limit": limit})
            ids = [row[0] for row in cursor.fetchall()]
        done = workflow_fold(ids)
        folded += done
        if len(ids) < limit or not done:
            break
    return folded


def new_event(kind: str, *, workflow_id: UUID, step: Step | None = None,
              agent_id: UUID | None = None, data: dict[str, Any] | None = None) -> Event:
    """An unsaved event of a workflow (the database numbers it when it is inserted)."""
    return Event(
        workflow_id=workflow_id,
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
