"""Celery tasks: thin wrappers that take ids and call services (and the server's LLM)."""

import logging
from datetime import timedelta
from uuid import UUID

from celery import shared_task
from django.utils import timezone

from coordination import selectors
from coordination.services import (
    audits,
    file_locks,
    leases,
    workflow_control,
    workflow_counters,
    workflow_creation,
    workflow_specs,
    workspace,
)
from coordination.errors import InvalidState, InvalidWorkflow
from coordination.llm import server_llm
from coordination.models import Agent, AuditStatus, Workflow, WorkflowStatus

logger = logging.getLogger(__name__)


@shared_task(name="coordination.tasks.sweep_expired", ignore_result=True)
def sweep_expired() -> dict[str, int]:
    """Expire leases and file locks past their end, fold workflows' counter deltas into their rows, and settle
    workflows left unsettled (Celery beat, every AM_SWEEP_INTERVAL_S)."""
    return {"leases": leases.leases_sweep(), "locks": file_locks.locks_sweep(),
            "folded": workflow_counters.workflows_fold_sweep(),
            "workflows": workflow_control.workflows_settle_sweep()}


@shared_task(name="coordination.tasks.collect_unused_contents", ignore_result=True)
def collect_unused_contents() -> int:
    """Remove workspace contents no file version points to (a deleted project's), in bounded batches."""
    return workspace.contents_collect()


@shared_task(name="coordination.tasks.resend_stalled", ignore_result=True)
def resend_stalled() -> dict[str, int]:
    """Re-send planning and audits whose task was lost (a broker outage when they were queued)."""
    cutoff = timezone.now() - timedelta(minutes=2)
    planning = list(Workflow.objects.filter(status=WorkflowStatus.PLANNING, updated_at__lt=cutoff)
                    .values_list("id", flat=True)[:50])
    audits = list(Workflow.objects.filter(status=WorkflowStatus.COMPLETED, audit_status=AuditStatus.PENDING,
                                          updated_at__lt=cutoff).values_list("id", flat=True)[:50])
    for workflow_id in planning:
        plan_workflow.delay(str(workflow_id))
    for workflow_id in audits:
        audit_workflow.delay(str(workflow_id))
    return {"planning": len(planning), "audits": len(audits)}


def _spec_from_plan(plan: dict) -> tuple[workflow_specs.StepSpec, ...]:
    return tuple(
        workflow_specs.StepSpec(
            key=str(step.get("key", "")),
            name=str(step.get("name") or step.get("key", "")),
            role=str(step.get("role", "")),
            description=str(step.get("description", "")),
            depends_on=tuple(str(dep) for dep in step.get("depends_on") or []),
            files=tuple(workflow_specs.FileSpec(path=str(f.get("path", "")), mode=str(f.get("mode", "write")))
                        for f in step.get("files") or [] if isinstance(f, dict)),
        )
        for step in plan.get("steps", [])
    )


@shared_task(name="coordination.tasks.plan_workflow", ignore_result=True)
def plan_workflow(workflow_id: str) -> str:
    """Turn a goal into steps: ask the LLM, validate like a submitted graph, retry once with the problems."""
    from agents.llm.base import LLMError
    from agents.planner import plan

    workflow = Workflow.objects.select_related("project").filter(id=UUID(workflow_id)).first()
    if workflow is None or workflow.status != WorkflowStatus.PLANNING:
        return "skipped"
    roles = sorted({role for roles in Agent.objects.filter(enabled=True).values_list("roles", flat=True)
                    for role in roles})
    if not roles:
        workflow_creation.workflow_plan_failed(workflow_id=workflow.id, reason=(
            "No enabled agent is registered, so there are no roles to plan for: create agents first "
            "(manage.py create_agent) and submit the goal again."))
        return "failed"
    llm = server_llm()
    if llm is None:
        workflow_creation.workflow_plan_failed(workflow_id=workflow.id, reason=(
            "The server has no LLM to plan with: set AM_LLM=openai (with AM_LLM_BASE_URL and AM_LLM_MODEL), "
            "or submit the steps yourself."))
        return "failed"
    previous, problems = None, None
    for _ in range(2):
        try:
            proposal, usage = plan(llm, goal=workflow.goal, roles=roles, name=workflow.name,
                                   previous=previous, problems=problems)
        except LLMError as exc:
            workflow_creation.workflow_plan_failed(workflow_id=workflow.id, reason=f"The planner's LLM failed: {exc}")
            return "failed"
        steps = _spec_from_plan(proposal)
        problems = workflow_specs.workflow_validate(
            workflow_specs.WorkflowSpec(name=workflow.name, project=workflow.project.name, steps=steps))
        problems += [
            {"code": "unknown_role", "detail": f"Step {s.key!r} has role {s.role!r}, which no agent holds "
                                               f"(roles: {', '.join(roles)}).", "step": s.key}
            for s in steps if s.role not in roles
        ]
        if not problems:
            try:
                workflow_creation.workflow_plan_apply(workflow_id=workflow.id, steps=steps, usage=usage.as_dict())
            except (InvalidState, InvalidWorkflow) as exc:
                logger.warning("Plan for %s not applied: %s", workflow_id, exc)
                return "skipped"
            return "planned"
        previous = proposal
    workflow_creation.workflow_plan_failed(
        workflow_id=workflow.id,
        reason="The planner's graph was invalid twice: " + "; ".join(p["detail"] for p in problems[:5]),
    )
    return "failed"


@shared_task(name="coordination.tasks.audit_workflow", ignore_result=True)
def audit_workflow(workflow_id: str) -> str:
    """Judge a completed workflow: deterministic checks, plus an LLM review when one is configured."""
    from agents import auditor
    from agents.llm.base import LLMError

    workflow = Workflow.objects.filter(id=UUID(workflow_id)).first()
    if workflow is None or workflow.status != WorkflowStatus.COMPLETED:
        return "skipped"
    checks = selectors.workflow_audit_checks(workflow=workflow)
    steps = selectors.workflow_steps_for_review(workflow=workflow)
    failed_checks = [c for c in checks if c["required"] and not c["passed"]]
    suggestions = [{"step": key, "reason": check["detail"]} for check in failed_checks for key in check.get("steps", [])]
    llm = server_llm()
    review = None
    if llm is not None:
        try:
            review, _ = auditor.review(llm, goal=workflow.goal, name=workflow.name, steps=steps, checks=checks)
        except LLMError as exc:
            checks.append({"name": "llm_review", "required": False, "passed": False,
                           "detail": f"The LLM review could not run: {exc}"})
    successful = not failed_checks and (review is None or bool(review["successful"]))
    if review is not None:
        suggestions += [s for s in review.get("rework_suggestions", []) if s.get("step")]
    feedback = (review or {}).get("feedback") or (
        "All checks passed." if not failed_checks else " ".join(c["detail"] for c in failed_checks))
    report = audits.audit_record(workflow_id=workflow.id, findings=audits.AuditFindings(
        successful=successful, feedback=feedback, rework_suggestions=suggestions,
        confidence=float((review or {}).get("confidence", 1.0 if not failed_checks else 0.5)),
        criteria=(review or {}).get("criteria") or [c["name"] for c in checks],
        checks=checks, steps_reviewed=[s["key"] for s in steps],
        reviewer=getattr(llm, "model", None) or getattr(llm, "name", None) or "checks",
    ))
    workflow.refresh_from_db()
    if workflow.status == WorkflowStatus.COMPLETED:
        synthesis, source = auditor.concatenate(goal=workflow.goal, name=workflow.name, steps=steps), "concatenation"
        if llm is not None:
            try:
                synthesis, _ = auditor.synthesize(llm, goal=workflow.goal, name=workflow.name, steps=steps)
                source = getattr(llm, "model", None) or llm.name
            except LLMError as exc:
                logger.warning("Synthesis by LLM failed for %s (%s); concatenating results.", workflow_id, exc)
        audits.workflow_set_synthesis(workflow_id=workflow.id, synthesis=synthesis, source=source)
    return "passed" if report.successful else "failed"
