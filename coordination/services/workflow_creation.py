"""Workflows come into being: a submitted graph stored in one transaction, or a goal planned into one."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from coordination import notify
from coordination.errors import InvalidState, InvalidWorkflow
from coordination.models import Agent, Step, StepDependency, StepStatus, Workflow, WorkflowStatus
from coordination.services import background, event_log, lock_order
from coordination.services.projects import project_get_or_create
from coordination.services.workflow_specs import (
    PROJECT_RE,
    StepSpec,
    WorkflowSpec,
    normalised_files,
    problem,
    workflow_validate,
)


@transaction.atomic
def workflow_create(
    *,
    spec: WorkflowSpec,
    user: AbstractBaseUser | None = None,
    agent: Agent | None = None,
) -> Workflow:
    """Validate a submitted graph and store it in one transaction.

    Steps without dependencies are `ready`, the others `pending`. Nothing is
    stored when the graph is rejected (`InvalidWorkflow` lists every problem).
    A workflow with a goal and no steps is stored as `planning`, and the
    planner is asked (after commit) to turn the goal into steps.
    """
    planning = not spec.steps and bool(spec.goal.strip())
    problems = [] if planning else workflow_validate(spec)
    if planning:
        if not spec.name.strip():
            problems.append(problem("empty_name", "The workflow needs a name."))
        if not PROJECT_RE.match(spec.project or ""):
            problems.append(problem("bad_project", f"{spec.project!r} is not a valid project name."))
    if problems:
        raise InvalidWorkflow(problems)

    project = project_get_or_create(name=spec.project)
    workflow = Workflow.objects.create(
        project=project,
        name=spec.name.strip(),
        goal=spec.goal,
        status=WorkflowStatus.PLANNING if planning else WorkflowStatus.RUNNING,
        priority=spec.priority,
        max_attempts=spec.max_attempts or settings.AM_DEFAULT_MAX_ATTEMPTS,
        max_rework_rounds=spec.max_rework_rounds,
        budget_usd=spec.budget_usd,
        budget_tokens=spec.budget_tokens,
        metadata=spec.metadata,
        created_by_user=user if user is not None and user.is_authenticated else None,
        created_by_agent=agent,
    )
    ready = create_steps(workflow=workflow, steps=spec.steps) if not planning else []
    event_log.event_record(
        kind="workflow.created",
        workflow_id=workflow.id,
        agent_id=agent.id if agent else None,
        data={
            "name": workflow.name,
            "project": project.name,
            "status": workflow.status,
            "total_steps": len(spec.steps),
            "ready": ready,
        },
    )
    if planning:
        background.enqueue_after_commit("coordination.tasks.plan_workflow", workflow.id)
    workflow.refresh_from_db()
    return workflow


def create_steps(*, workflow: Workflow, steps: tuple[StepSpec, ...]) -> list[str]:
    """Insert a validated graph's steps and edges in bulk; set the counters; return the ready keys."""
    now = timezone.now()
    ready_keys = {step.key for step in steps if not step.depends_on}
    steps_by_key: dict[str, Step] = {}
    for step in steps:
        is_ready = step.key in ready_keys
        steps_by_key[step.key] = Step(
            workflow=workflow,
            key=step.key,
            name=step.name.strip(),
            description=step.description,
            role=step.role,
            status=StepStatus.READY if is_ready else StepStatus.PENDING,
            priority=step.priority,
            workflow_priority=workflow.priority,
            max_attempts=step.max_attempts or workflow.max_attempts,
            lease_ttl_s=min(step.lease_ttl_s or settings.AM_DEFAULT_LEASE_TTL_S, settings.AM_MAX_LEASE_TTL_S),
            remaining_deps=len(step.depends_on),
            files=normalised_files(step),
            available_at=now if is_ready else None,
        )
    Step.objects.bulk_create(steps_by_key.values(), batch_size=1000)
    StepDependency.objects.bulk_create(
        (
            StepDependency(workflow=workflow, step=steps_by_key[step.key], depends_on=steps_by_key[dep])
            for step in steps
            for dep in step.depends_on
        ),
        batch_size=2000,
    )
    Workflow.objects.filter(id=workflow.id).update(
        total_steps=len(steps), n_ready=len(ready_keys), n_pending=len(steps) - len(ready_keys)
    )
    notify.notify_ready(step.role for step in steps if step.key in ready_keys)
    return sorted(ready_keys)


@transaction.atomic
def workflow_plan_apply(*, workflow_id: UUID, steps: tuple[StepSpec, ...], usage: dict[str, Any] | None = None) -> Workflow:
    """Give a `planning` workflow the steps the planner made (already validated) and start it."""
    workflow = lock_order.lock_workflow(workflow_id)
    if workflow.status != WorkflowStatus.PLANNING:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}, not planning.")
    problems = workflow_validate(WorkflowSpec(name=workflow.name, project=workflow.project.name, steps=steps))
    if problems:
        raise InvalidWorkflow(problems)
    ready = create_steps(workflow=workflow, steps=steps)
    Workflow.objects.filter(id=workflow.id).update(status=WorkflowStatus.RUNNING)
    event_log.event_record(kind="workflow.planned", workflow_id=workflow.id,
                 data={"total_steps": len(steps), "ready": ready, **({"usage": usage} if usage else {})})
    workflow.refresh_from_db()
    return workflow


@transaction.atomic
def workflow_plan_failed(*, workflow_id: UUID, reason: str) -> Workflow:
    workflow = lock_order.lock_workflow(workflow_id)
    if workflow.status != WorkflowStatus.PLANNING:
        return workflow
    workflow.status = WorkflowStatus.FAILED
    workflow.failure_reason = reason
    workflow.finished_at = timezone.now()
    workflow.save(update_fields=["status", "failure_reason", "finished_at", "updated_at"])
    event_log.event_record(kind="workflow.failed", workflow_id=workflow.id, data={"status": "failed", "reason": reason})
    return workflow
