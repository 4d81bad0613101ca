"""Every state change of the coordination domain.

Whatever calls them (API views, dashboard, admin actions, Celery tasks, the
MCP endpoint), writes go through these functions: they hold the business rules,
lock what they change, record an `Event` in the same transaction and publish it
after commit.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from coordination.errors import InvalidPath, InvalidRequest, InvalidWorkflow
from coordination.events import event_record
from coordination.models import (
    KEY_PATTERN,
    ROLE_PATTERN,
    Agent,
    LockMode,
    Project,
    Step,
    StepDependency,
    StepStatus,
    Workflow,
    WorkflowStatus,
)
from coordination.paths import normalise_path

_ROLE_RE = re.compile(ROLE_PATTERN)
_KEY_RE = re.compile(KEY_PATTERN)
_PROJECT_RE = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")

# --- tokens -----------------------------------------------------------------


def token_hash(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 pass is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


def _new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


# --- agents -----------------------------------------------------------------


def parse_roles(raw: str | list[str]) -> list[str]:
    """Roles from "a,b" or a list: slugs, de-duplicated, order kept; raise InvalidRequest otherwise."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    roles: list[str] = []
    for item in items:
        role = item.strip() if isinstance(item, str) else item
        if not isinstance(role, str) or not _ROLE_RE.match(role):
            raise InvalidRequest(
                f"{role!r} is not a valid role: use a slug of a-z, 0-9, '_' and '-' (1 to 64 characters)."
            )
        if role not in roles:
            roles.append(role)
    if not roles:
        raise InvalidRequest("Give at least one role.")
    return roles


@transaction.atomic
def agent_create(
    *, name: str, roles: list[str], capacity: int = 1, can_submit: bool = False
) -> tuple[Agent, str]:
    """Register an agent; return it with its bearer token, which is not stored and cannot be shown again."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequest("An agent name must be 1 to 100 characters.")
    if capacity < 1:
        raise InvalidRequest(f"Capacity must be at least 1, not {capacity}.")
    roles = parse_roles(roles)
    if Agent.objects.filter(name=name).exists():
        raise InvalidRequest(f"An agent named {name!r} exists already: choose another name.")
    token = _new_token("am")
    agent = Agent.objects.create(
        name=name,
        roles=roles,
        capacity=capacity,
        can_submit=can_submit,
        token_hash=token_hash(token),
        token_prefix=token[:10],
    )
    event_record(kind="agent.created", agent_id=agent.id, data={"name": name, "roles": roles})
    return agent, token


# --- workflows --------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    path: str
    mode: str = LockMode.WRITE


@dataclass(frozen=True)
class StepSpec:
    key: str
    name: str
    role: str
    description: str = ""
    depends_on: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    priority: int = 0
    max_attempts: int | None = None
    lease_ttl_s: int | None = None


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    steps: tuple[StepSpec, ...] = ()
    project: str = "default"
    goal: str = ""
    priority: int = 0
    max_attempts: int | None = None
    max_rework_rounds: int = 1
    budget_usd: Decimal | None = None
    budget_tokens: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _problem(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "detail": detail, **extra}


def _find_cycle(keys: list[str], deps: dict[str, list[str]]) -> list[str] | None:
    """Return one dependency cycle as keys in order (first key repeated at the end), or None.

    1. Kahn's algorithm peels off every step that does not sit on or behind a cycle.
    2. From any step left, follow dependencies that are also left until a step
       repeats: the walk from its first visit is a cycle. Iterative, so a deep
       graph cannot exhaust the stack.
    """
    indegree = {key: 0 for key in keys}
    dependents: dict[str, list[str]] = {key: [] for key in keys}
    for key in keys:
        for dep in deps[key]:
            indegree[key] += 1
            dependents[dep].append(key)
    queue = deque(key for key in keys if indegree[key] == 0)
    removed = 0
    while queue:
        key = queue.popleft()
        removed += 1
        for child in dependents[key]:
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    if removed == len(keys):
        return None
    left = {key for key in keys if indegree[key] > 0}
    position: dict[str, int] = {}
    walk: list[str] = []
    node = next(key for key in keys if key in left)
    while node not in position:
        position[node] = len(walk)
        walk.append(node)
        node = next(dep for dep in deps[node] if dep in left)
    # The walk follows "depends on" edges; report the cycle in execution order,
    # starting from the step submitted first.
    cycle = walk[position[node]:]
    cycle.reverse()
    order = {key: index for index, key in enumerate(keys)}
    start = min(range(len(cycle)), key=lambda i: order[cycle[i]])
    cycle = cycle[start:] + cycle[:start]
    return cycle + [cycle[0]]


def workflow_validate(spec: WorkflowSpec) -> list[dict[str, Any]]:
    """Every problem of a submitted graph, each naming its culprit; empty when the graph is valid.

    The planner's graphs are checked by exactly this function too.
    """
    problems: list[dict[str, Any]] = []
    steps = spec.steps
    limit = settings.AM_MAX_STEPS_PER_WORKFLOW
    if not spec.name.strip():
        problems.append(_problem("empty_name", "The workflow needs a name."))
    if not _PROJECT_RE.match(spec.project or ""):
        problems.append(
            _problem("bad_project", f"{spec.project!r} is not a valid project name: use 1 to 64 letters, digits, '_' or '-'.")
        )
    if not steps:
        problems.append(_problem("empty_graph", "The workflow has no steps: give at least one step, or a goal to plan."))
        return problems
    if len(steps) > limit:
        problems.append(
            _problem("too_many_steps", f"The workflow has {len(steps)} steps; the limit is {limit} (AM_MAX_STEPS_PER_WORKFLOW).")
        )
        return problems

    seen: set[str] = set()
    for index, step in enumerate(steps):
        if not _KEY_RE.match(step.key or ""):
            problems.append(
                _problem(
                    "bad_key",
                    f"Step #{index + 1} has key {step.key!r}: use 1 to 100 letters, digits, '_', '.', ':' or '-'.",
                    step=step.key,
                )
            )
        elif step.key in seen:
            problems.append(_problem("duplicate_key", f"Step key {step.key!r} is used more than once.", step=step.key))
        seen.add(step.key)
        if not _ROLE_RE.match(step.role or ""):
            problems.append(
                _problem(
                    "bad_role",
                    f"Step {step.key!r} has role {step.role!r}: a role is a slug of a-z, 0-9, '_' and '-', "
                    "starting with a letter or digit, at most 64 characters.",
                    step=step.key,
                )
            )
        if not step.name.strip():
            problems.append(_problem("empty_name", f"Step {step.key!r} needs a name.", step=step.key))
        for file in step.files:
            try:
                normalise_path(file.path)
            except InvalidPath as exc:
                problems.append(_problem("bad_file", f"Step {step.key!r}: {exc.detail}", step=step.key, path=file.path))
            if file.mode not in LockMode.values:
                problems.append(
                    _problem("bad_file", f"Step {step.key!r}: file mode {file.mode!r} is not 'read' or 'write'.",
                             step=step.key, path=file.path)
                )
        seen_deps: set[str] = set()
        for dep in step.depends_on:
            if dep == step.key:
                problems.append(_problem("self_dependency", f"Step {step.key!r} depends on itself.", step=step.key))
            elif dep in seen_deps:
                problems.append(
                    _problem("duplicate_dependency", f"Step {step.key!r} lists {dep!r} twice in depends_on.", step=step.key)
                )
            seen_deps.add(dep)
    keys = {step.key for step in steps}
    for step in steps:
        for dep in step.depends_on:
            if dep not in keys:
                problems.append(
                    _problem("unknown_dependency", f"Step {step.key!r} depends on {dep!r}, which is not a step of this workflow.",
                             step=step.key, depends_on=dep)
                )
    if problems:
        return problems
    ordered = [step.key for step in steps]
    cycle = _find_cycle(ordered, {step.key: list(step.depends_on) for step in steps})
    if cycle:
        problems.append(_problem("cycle", f"Dependency cycle: {' -> '.join(cycle)}.", cycle=cycle))
    return problems


def project_get_or_create(*, name: str) -> Project:
    project = Project.objects.filter(name=name).first()
    if project is not None:
        return project
    try:
        with transaction.atomic():
            project = Project.objects.create(name=name)
    except IntegrityError:
        # Created by a concurrent request in between: use theirs.
        return Project.objects.get(name=name)
    event_record(kind="project.created", data={"project": name})
    return project


def _normalised_files(step: StepSpec) -> list[dict[str, str]]:
    files: dict[str, str] = {}
    for file in step.files:
        path = normalise_path(file.path)
        # The same path twice: the stronger mode wins.
        if files.get(path) != LockMode.WRITE:
            files[path] = file.mode
    return [{"path": path, "mode": mode} for path, mode in files.items()]


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
    A workflow with a goal and no steps is stored as `planning` for the planner.
    """
    planning = not spec.steps and bool(spec.goal.strip())
    problems = [] if planning else workflow_validate(spec)
    if planning:
        if not spec.name.strip():
            problems.append(_problem("empty_name", "The workflow needs a name."))
        if not _PROJECT_RE.match(spec.project or ""):
            problems.append(_problem("bad_project", f"{spec.project!r} is not a valid project name."))
    if problems:
        raise InvalidWorkflow(problems)

    now = timezone.now()
    default_attempts = spec.max_attempts or settings.AM_DEFAULT_MAX_ATTEMPTS
    project = project_get_or_create(name=spec.project)
    ready_keys = {step.key for step in spec.steps if not step.depends_on}
    workflow = Workflow.objects.create(
        project=project,
        name=spec.name.strip(),
        goal=spec.goal,
        status=WorkflowStatus.PLANNING if planning else WorkflowStatus.RUNNING,
        priority=spec.priority,
        max_attempts=default_attempts,
        max_rework_rounds=spec.max_rework_rounds,
        budget_usd=spec.budget_usd,
        budget_tokens=spec.budget_tokens,
        metadata=spec.metadata,
        created_by_user=user if user is not None and user.is_authenticated else None,
        created_by_agent=agent,
        total_steps=len(spec.steps),
        n_ready=len(ready_keys),
        n_pending=len(spec.steps) - len(ready_keys),
        event_seq=1,
    )
    steps_by_key: dict[str, Step] = {}
    for step in spec.steps:
        is_ready = step.key in ready_keys
        steps_by_key[step.key] = Step(
            workflow=workflow,
            key=step.key,
            name=step.name.strip(),
            description=step.description,
            role=step.role,
            status=StepStatus.READY if is_ready else StepStatus.PENDING,
            priority=step.priority,
            workflow_priority=spec.priority,
            max_attempts=step.max_attempts or default_attempts,
            lease_ttl_s=min(step.lease_ttl_s or settings.AM_DEFAULT_LEASE_TTL_S, settings.AM_MAX_LEASE_TTL_S),
            remaining_deps=len(step.depends_on),
            files=_normalised_files(step),
            available_at=now if is_ready else None,
        )
    Step.objects.bulk_create(steps_by_key.values(), batch_size=1000)
    StepDependency.objects.bulk_create(
        (
            StepDependency(workflow=workflow, step=steps_by_key[step.key], depends_on=steps_by_key[dep])
            for step in spec.steps
            for dep in step.depends_on
        ),
        batch_size=2000,
    )
    event_record(
        kind="workflow.created",
        workflow_id=workflow.id,
        agent_id=agent.id if agent else None,
        seq=1,
        data={
            "name": workflow.name,
            "project": project.name,
            "status": workflow.status,
            "total_steps": workflow.total_steps,
            "ready": sorted(ready_keys),
        },
    )
    return workflow
