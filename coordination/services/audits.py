"""Audits: a finished workflow judged, and the steps the audit names sent back for rework; the synthesis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from coordination import notify
from coordination.errors import InvalidState, NotFound
from coordination.models import Agent, AuditReport, AuditStatus, Step, StepDependency, StepStatus, Workflow, WorkflowStatus
from coordination.services import background, event_log, lock_order
from coordination.services.lock_order import RetryTransaction
from coordination.services.workflow_counters import actor, add, new_event, workflow_move


@dataclass
class AuditFindings:
    successful: bool
    feedback: str
    rework_suggestions: list[dict[str, str]]
    confidence: float
    criteria: list[str]
    checks: list[dict[str, Any]]
    steps_reviewed: list[str]
    reviewer: str


@lock_order.retrying
def workflow_audit_request(*, workflow_id: UUID, user: AbstractBaseUser | None = None,
                           agent: Agent | None = None) -> Workflow:
    """Ask for an audit now (POST /v1/workflows/{id}/audits): it runs in a Celery worker."""
    workflow = lock_order.lock_workflow(workflow_id)
    if workflow.status != WorkflowStatus.COMPLETED:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}; only a completed workflow is audited.")
    workflow.audit_status = AuditStatus.PENDING
    workflow.save(update_fields=["audit_status", "updated_at"])
    event_log.event_record(kind="audit.requested", workflow_id=workflow.id, agent_id=agent.id if agent else None,
                           data=actor(user, agent))
    background.enqueue_after_commit("coordination.tasks.audit_workflow", workflow.id)
    return workflow


def _reworks(workflow: Workflow, findings: AuditFindings, keys: list[str]) -> bool:
    return (not findings.successful and bool(keys) and workflow.status == WorkflowStatus.COMPLETED
            and workflow.rework_round < workflow.max_rework_rounds)


@lock_order.retrying
def audit_record(*, workflow_id: UUID, findings: AuditFindings) -> AuditReport:
    """Store an audit; a failed one sends the named steps back for rework while rounds remain.

    The steps to rework are locked before the workflow (the lock order); if the
    workflow changed in between, the transaction runs again.
    """
    seen = Workflow.objects.filter(id=workflow_id).first()
    if seen is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    named = {s["step"] for s in findings.rework_suggestions}
    keys = sorted(set(Step.objects.filter(workflow_id=workflow_id, key__in=named).values_list("key", flat=True)))
    steps = lock_order.lock_steps_and_downstream(workflow_id, keys) if _reworks(seen, findings, keys) else []
    workflow = lock_order.lock_workflow(workflow_id)
    if (workflow.status, workflow.rework_round) != (seen.status, seen.rework_round):
        raise RetryTransaction(f"workflow {workflow_id} changed while its audit was being recorded")
    report = AuditReport.objects.create(
        workflow=workflow, round=workflow.rework_round, successful=findings.successful,
        feedback=findings.feedback, rework_suggestions=findings.rework_suggestions,
        confidence=max(0.0, min(1.0, findings.confidence)), steps_reviewed=findings.steps_reviewed,
        criteria=findings.criteria, checks=findings.checks, reviewer=findings.reviewer,
    )
    workflow.audit_status = AuditStatus.PASSED if findings.successful else AuditStatus.FAILED
    workflow.save(update_fields=["audit_status", "updated_at"])
    event_log.event_record(kind="audit.recorded", workflow_id=workflow.id,
                           data={"audit_id": str(report.id), "successful": findings.successful, "round": report.round,
                                 "rework": [s["step"] for s in findings.rework_suggestions]})
    if steps:
        _workflow_rework(workflow=workflow, steps=steps, keys=keys, report=report, findings=findings)
    return report


def _workflow_rework(*, workflow: Workflow, steps: list[Step], keys: list[str], report: AuditReport,
                     findings: AuditFindings) -> None:
    """The named steps and everything downstream of them (locked) run again, with the auditor's feedback."""
    now = timezone.now()
    inside = {step.id for step in steps}
    open_deps: dict[UUID, int] = {step_id: 0 for step_id in inside}
    for step_id, dep_id in StepDependency.objects.filter(step_id__in=inside).values_list("step_id", "depends_on_id"):
        if dep_id in inside:
            open_deps[step_id] += 1
    reasons = {s["step"]: s["reason"] for s in findings.rework_suggestions}
    round_number = workflow.rework_round + 1
    moves: dict[str, int] = {}
    ready_roles = []
    for step in steps:
        add(moves, step.status, -1)
        step.remaining_deps = open_deps[step.id]
        step.status = StepStatus.READY if step.remaining_deps == 0 else StepStatus.PENDING
        add(moves, step.status, 1)
        step.available_at = now if step.status == StepStatus.READY else None
        step.attempts_released = step.attempt
        step.finished_at = None
        step.extra_inputs = {**(step.extra_inputs or {}), "_audit": {
            "round": round_number, "feedback": findings.feedback,
            "reason": reasons.get(step.key, f"An upstream step ({', '.join(keys)}) is being redone."),
            "previous_result": step.final_result[:4000],
        }}
        if step.status == StepStatus.READY:
            ready_roles.append(step.role)
    Step.objects.bulk_update(steps, ["remaining_deps", "status", "available_at", "attempts_released",
                                     "finished_at", "extra_inputs", "updated_at"])
    workflow_move(workflow.id, moves)
    Workflow.objects.filter(id=workflow.id).update(status=WorkflowStatus.RUNNING, finished_at=None,
                                                   rework_round=round_number)
    notify.notify_ready(ready_roles)
    event_log.event_record_many([new_event("workflow.rework", workflow_id=workflow.id,
                                           data={"round": round_number, "steps": keys, "rerun": len(steps),
                                                 "audit_id": str(report.id)})])


@lock_order.retrying
def workflow_set_synthesis(*, workflow_id: UUID, synthesis: str, source: str) -> Workflow:
    workflow = lock_order.lock_workflow(workflow_id)
    workflow.synthesis = synthesis
    workflow.save(update_fields=["synthesis", "updated_at"])
    event_log.event_record(kind="workflow.synthesized", workflow_id=workflow.id,
                           data={"source": source, "length": len(synthesis)})
    return workflow
