"""AgentManager's spans beyond single requests: a workflow, and each attempt at a step (lease to end).

Services call these where the thing ends; each returns at once while tracing is
off (`telemetry.tracer is None`), and otherwise sends its span once the
transaction commits (a transaction retried or rolled back sends nothing). A
workflow's trace id is its id; an attempt's span is the child of its workflow's
root span, with the span id its lease handed to the worker (`attempt_traceparent`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import connection, transaction

from am_project import telemetry
from coordination.models import Attempt, AttemptOutcome, Step, Workflow, WorkflowStatus

logger = logging.getLogger(__name__)

FAILED_OUTCOMES = frozenset({AttemptOutcome.FAILED, AttemptOutcome.RETRY, AttemptOutcome.EXPIRED})
# Plain SQL: the kinds (`models.SETTLED_EVENT_KINDS`) written into the text, as in the partial index
# `event_workflow_settled`, so the planner reads that index whatever the plan (a bound parameter could not prove
# the index's condition): the cost follows the workflow's settles, not its events. A test checks the plan.
SETTLES_SQL = """
SELECT count(*) AS n FROM coordination_event
WHERE workflow_id = %(workflow)s AND kind IN ('workflow.completed', 'workflow.failed', 'workflow.cancelled')
"""


def attempt_traceparent(*, workflow_id: UUID, attempt_id: UUID) -> str | None:
    """The W3C `traceparent` of an attempt's span, for its lease; None while tracing is off."""
    if telemetry.tracer is None:
        return None
    return telemetry.traceparent(workflow_id, telemetry.derived_span_id("attempt", attempt_id))


def attempt_ended(*, step: Step, attempt: Attempt, agent_name: str | None, error: str = "") -> None:
    """An attempt's span, from its lease to `attempt.ended_at`, with how it ended (`attempt.outcome`)."""
    if telemetry.tracer is None:
        return
    attributes = {
        "am.workflow.id": str(step.workflow_id), "am.step.id": str(step.id), "am.step.key": step.key,
        "am.step.role": step.role, "am.attempt": attempt.number, "am.attempt.id": str(attempt.id),
        "am.outcome": str(attempt.outcome),
    }
    if agent_name:
        attributes["am.agent.name"] = agent_name
    failed = attempt.outcome in FAILED_OUTCOMES
    span = {"name": f"attempt {step.role}", "workflow_id": step.workflow_id, "attempt_id": attempt.id,
            "start": attempt.started_at, "end": attempt.ended_at, "attributes": attributes,
            "error": (error or attempt.get_outcome_display()) if failed else ""}
    transaction.on_commit(lambda: _send(_attempt_span, **span), robust=True)


def attempts_cancelled(*, step_ids: list[UUID], ended_at: datetime) -> None:
    """The spans of the open attempts of `step_ids`, which a cancel is ending (call it before it does)."""
    if telemetry.tracer is None:
        return
    for attempt in Attempt.objects.filter(step_id__in=step_ids, ended_at__isnull=True).select_related("step", "agent"):
        attempt.ended_at = ended_at
        attempt.outcome = AttemptOutcome.CANCELLED
        attempt_ended(step=attempt.step, attempt=attempt, agent_name=attempt.agent.name if attempt.agent else None)


def workflow_settled(*, workflow_id: UUID) -> None:
    """The workflow's root span, from its creation to now, the first time it settles.

    A workflow sent back to work after settling (an audit's rework, a retried
    step) keeps that one root: the attempts of the later rounds hang under it
    too, and end after it.
    """
    if telemetry.tracer is None:
        return
    transaction.on_commit(lambda: _send(_workflow_span, workflow_id=workflow_id), robust=True)


def _send(make, **kwargs: Any) -> None:
    """Make a span; a failure to do so is logged and never reaches the request or task that ended the work."""
    if telemetry.tracer is None:
        return
    try:
        make(**kwargs)
    except Exception:  # noqa: BLE001 - traces are a view of the work, never a reason for it to fail
        logger.exception("Could not make the span %s", kwargs.get("name", make.__name__))


def _attempt_span(*, name: str, workflow_id: UUID, attempt_id: UUID, start: datetime, end: datetime,
                  attributes: dict[str, Any], error: str) -> None:
    telemetry.span_with_ids(name, span_id=telemetry.derived_span_id("attempt", attempt_id),
                            context=telemetry.workflow_context(workflow_id), start=start, end=end,
                            attributes=attributes, error=error)


def _workflow_span(*, workflow_id: UUID) -> None:
    with connection.cursor() as cursor:
        cursor.execute(SETTLES_SQL, {"workflow": workflow_id})
        if cursor.fetchone()[0] != 1:
            return  # not its first time: the root span was made then
    workflow = (Workflow.objects.filter(id=workflow_id)
                .values("name", "status", "created_at", "finished_at", "project__name", "failure_reason").first())
    if workflow is None or workflow["finished_at"] is None:
        return
    failed = workflow["status"] == WorkflowStatus.FAILED
    telemetry.span_with_ids(
        "workflow", trace_id=telemetry.workflow_trace_id(workflow_id),
        span_id=telemetry.derived_span_id("workflow", workflow_id),
        start=workflow["created_at"], end=workflow["finished_at"],
        attributes={"am.workflow.id": str(workflow_id), "am.workflow.name": workflow["name"],
                    "am.project": workflow["project__name"], "am.workflow.status": workflow["status"]},
        error=(workflow["failure_reason"] or "failed") if failed else "",
    )
