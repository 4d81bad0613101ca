"""Every state change of the coordination domain.

Whatever calls them (API views, dashboard, admin actions, Celery tasks, the
MCP endpoint), writes go through these functions: they hold the business rules,
lock what they change, record an `Event` in the same transaction and publish it
after commit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from agents.llm.base import Usage  # one definition for workers and server
from coordination import notify, rows
from coordination.errors import (
    AtCapacity,
    Conflict,
    Forbidden,
    InvalidPath,
    InvalidRequest,
    InvalidState,
    InvalidWorkflow,
    LockConflict,
    NotFound,
    StaleLease,
)
from coordination.events import event_published, event_record, event_record_many
from coordination.models import (
    KEY_PATTERN,
    ROLE_PATTERN,
    STEP_COUNTER_FIELDS,
    TERMINAL_WORKFLOW_STATUSES,
    Agent,
    Attempt,
    AttemptOutcome,
    AuditReport,
    AuditStatus,
    Event,
    LockMode,
    Project,
    Result,
    Step,
    StepDependency,
    StepStatus,
    Workflow,
    WorkflowStatus,
)
from coordination.paths import normalise_path, paths_overlap

logger = logging.getLogger(__name__)
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
        if role == "human":
            raise InvalidRequest("The 'human' role is for approval steps that people decide in the dashboard.")
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


def user_token_create(*, user: AbstractBaseUser, name: str) -> str:
    """An API token acting as `user` (a script or pipeline); returned once, only its hash is stored."""
    from coordination.models import UserToken

    token = _new_token("amu")
    UserToken.objects.create(user=user, name=name[:100] or "token", token_hash=token_hash(token), token_prefix=token[:10])
    event_record(kind="user_token.created", data={"user": user.get_username(), "name": name})
    return token


@transaction.atomic
def agent_rotate_token(*, agent: Agent) -> str:
    """Give an agent a new token (the old one stops working at once); returned once, only its hash is stored."""
    token = _new_token("am")
    Agent.objects.filter(id=agent.id).update(token_hash=token_hash(token), token_prefix=token[:10])
    event_record(kind="agent.token_rotated", agent_id=agent.id, data={"name": agent.name})
    return token


@transaction.atomic
def agent_ensure(*, name: str, roles: list[str], capacity: int = 1) -> tuple[Agent, str]:
    """The named agent with these roles (created, or updated), and a fresh token for it."""
    agent = Agent.objects.select_for_update().filter(name=name).first()
    if agent is None:
        return agent_create(name=name, roles=roles, capacity=capacity)
    Agent.objects.filter(id=agent.id).update(roles=parse_roles(roles), capacity=capacity, enabled=True)
    agent.refresh_from_db()
    return agent, agent_rotate_token(agent=agent)


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
    A workflow with a goal and no steps is stored as `planning`, and the
    planner is asked (after commit) to turn the goal into steps.
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
        event_seq=1,
    )
    ready = _create_steps(workflow=workflow, steps=spec.steps) if not planning else []
    event_record(
        kind="workflow.created",
        workflow_id=workflow.id,
        agent_id=agent.id if agent else None,
        seq=1,
        data={
            "name": workflow.name,
            "project": project.name,
            "status": workflow.status,
            "total_steps": len(spec.steps),
            "ready": ready,
        },
    )
    if planning:
        _enqueue_after_commit("coordination.tasks.plan_workflow", workflow.id)
    workflow.refresh_from_db()
    return workflow


def _create_steps(*, workflow: Workflow, steps: tuple[StepSpec, ...]) -> list[str]:
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
            files=_normalised_files(step),
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


def _enqueue_after_commit(task_name: str, *args: Any) -> None:
    """Send a Celery task once the transaction commits; a broker outage is logged, not raised
    (Celery beat re-sends planning and audits that were never picked up)."""

    def send() -> None:
        from am_project.celery import app

        try:
            app.send_task(task_name, args=[str(arg) for arg in args])
        except Exception:  # noqa: BLE001 - the change is committed; the beat sweep retries the work
            import logging

            logging.getLogger(__name__).warning("Could not queue %s%s; it will be retried.", task_name, args,
                                                exc_info=True)

    transaction.on_commit(send)


# --- the workflow row: counters, event sequence, terminal states ------------

_COUNTER_COLUMNS = list(STEP_COUNTER_FIELDS.values())


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

    def budget_exceeded(self) -> str:
        """Why the spend has reached the budget, or '' while it has not."""
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            return f"budget: spent ${self.spent_usd:.4f} of ${self.budget_usd:.4f}"
        if self.budget_tokens is not None and self.spent_tokens >= self.budget_tokens:
            return f"budget: used {self.spent_tokens} of {self.budget_tokens} tokens"
        return ""

    def seqs(self):
        return iter(range(self.first_seq, self.last_seq + 1))


def _add(moves: dict[str, int], status: str, delta: int) -> None:
    moves[status] = moves.get(status, 0) + delta


def _workflow_move(
    workflow_id: UUID,
    moves: dict[str, int],
    *,
    events: int = 1,
    spent_usd: Decimal = Decimal(0),
    spent_tokens: int = 0,
) -> WorkflowSnapshot:
    """Apply step-count deltas, add spend and allocate `events` sequence numbers, in one statement.

    The UPDATE also takes the workflow row lock, which orders every change of
    one workflow; its cost does not depend on the number of steps.
    """
    sets = ["event_seq = event_seq + %s", "updated_at = statement_timestamp()"]
    params: list[Any] = [events]
    for status, delta in moves.items():
        if delta:
            column = STEP_COUNTER_FIELDS[status]
            sets.append(f"{column} = {column} + %s")
            params.append(delta)
    if spent_usd:
        sets.append("spent_usd = spent_usd + %s")
        params.append(spent_usd)
    if spent_tokens:
        sets.append("spent_tokens = spent_tokens + %s")
        params.append(spent_tokens)
    params.append(workflow_id)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE coordination_workflow SET {', '.join(sets)} WHERE id = %s "
            f"RETURNING event_seq, status, total_steps, spent_usd, spent_tokens, budget_usd, budget_tokens, "
            f"{', '.join(_COUNTER_COLUMNS)}",
            params,
        )
        row = cursor.fetchone()
    if row is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    last_seq, status, total, spent_usd, spent_tokens, budget_usd, budget_tokens, *counts = row
    return WorkflowSnapshot(
        id=workflow_id,
        status=status,
        total_steps=total,
        counts=dict(zip(STEP_COUNTER_FIELDS.keys(), counts)),
        first_seq=last_seq - events + 1,
        last_seq=last_seq,
        spent_usd=spent_usd,
        spent_tokens=spent_tokens,
        budget_usd=budget_usd,
        budget_tokens=budget_tokens,
    )


def _event(snapshot_seqs, kind: str, *, workflow_id: UUID, step: Step | None = None,
           agent_id: UUID | None = None, data: dict[str, Any] | None = None):
    return Event(
        workflow_id=workflow_id,
        seq=next(snapshot_seqs),
        kind=kind,
        step_id=step.id if step else None,
        agent_id=agent_id,
        data={**({"step": step.key} if step else {}), **(data or {})},
    )


def _settled_status(snapshot: WorkflowSnapshot) -> str:
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


def _settle_workflow(snapshot: WorkflowSnapshot) -> str:
    """Finish a running or paused workflow when nothing more can run (see `_settled_status`); return its status."""
    new_status = _settled_status(snapshot)
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
    event_record(kind=f"workflow.{new_status}", workflow_id=snapshot.id,
                 data={"status": new_status, "counts": counts, **({"reason": reason} if reason else {})})
    if audit:
        _enqueue_after_commit("coordination.tasks.audit_workflow", snapshot.id)
    return new_status


# --- leases -----------------------------------------------------------------


def lease_token_for(attempt_id: UUID) -> str:
    """The lease token of an attempt: derived, so only its hash is stored yet a retried pull can get it again."""
    digest = hmac.new(settings.SECRET_KEY.encode(), f"am-lease:{attempt_id}".encode(), hashlib.sha256).digest()
    return "ls_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _backoff(charged_attempts: int) -> timedelta:
    """Delay before a step is handed out again: none after the first attempt, then exponential, capped."""
    if charged_attempts <= 1:
        return timedelta(0)
    seconds = settings.AM_RETRY_BACKOFF_BASE_S * 2 ** (charged_attempts - 2)
    return timedelta(seconds=min(seconds, settings.AM_RETRY_BACKOFF_MAX_S))


@dataclass
class Lease:
    step: Step
    attempt: Attempt
    token: str
    inputs: dict[str, Any]

    @property
    def expires_at(self) -> datetime:
        return self.step.lease_expires_at


@dataclass
class PullMiss:
    """No step was handed out.

    `next_available_at`: when a backed-off step becomes ready, if any.
    `blocked_projects`: projects whose ready steps were passed over because
    their declared files are locked; a lock released there is worth a re-check.
    """

    next_available_at: datetime | None
    blocked_projects: set[UUID] = field(default_factory=set)


# How many ready steps a pull may pass over because their files are locked.
MAX_LOCK_BLOCKED_CANDIDATES = 25


# The capacity check and the claim, in one statement. It runs after the agent's
# row is locked, so its snapshot sees every lease the agent was granted before.
# The claim takes the best ready step with `FOR UPDATE SKIP LOCKED` (concurrent
# pulls never get the same one) and brings what the lease answer needs: the
# workflow's and project's names and the dependencies' results.
_CLAIM_SQL_TEMPLATE = f"""
SELECT held.n, c.*
FROM (SELECT count(*) AS n FROM coordination_step
      WHERE lease_agent_id = %(agent)s AND status = 'in_progress') AS held
LEFT JOIN LATERAL (
    SELECT {rows.select_list(Step, "s")},
           w.name AS w_name, w.project_id AS w_project_id, p.name AS p_name,
           (SELECT coalesce(json_agg(json_build_array(d.key, d.final_result, d.outputs) ORDER BY d.key), '[]')
            FROM coordination_stepdependency e JOIN coordination_step d ON d.id = e.depends_on_id
            WHERE e.step_id = s.id) AS dep_results
    FROM coordination_step s
    JOIN coordination_workflow w ON w.id = s.workflow_id
    JOIN coordination_project p ON p.id = w.project_id
    WHERE held.n < %(capacity)s
      AND s.status = 'ready' AND {{role_condition}} AND s.role <> 'human' AND s.available_at <= %(now)s
      AND w.status = 'running'
      AND NOT (s.id = ANY(%(passed_over)s::uuid[]))
    ORDER BY s.workflow_priority DESC, s.priority DESC, s.available_at ASC
    LIMIT 1
    FOR UPDATE OF s SKIP LOCKED
) AS c ON true
"""
# One role (the usual pull) reads the ready-queue index in order and stops at the
# first unlocked row; several roles merge their queues (a sort of their ready steps).
_CLAIM_SQL = _CLAIM_SQL_TEMPLATE.format(role_condition="s.role = %(role)s")
_CLAIM_SQL_ROLES = _CLAIM_SQL_TEMPLATE.format(role_condition="s.role = ANY(%(roles)s::text[])")

_NEXT_AVAILABLE_SQL = """
SELECT min(s.available_at) FROM coordination_step s
JOIN coordination_workflow w ON w.id = s.workflow_id
WHERE s.status = 'ready' AND s.role = ANY(%s::text[]) AND s.available_at > %s AND w.status = 'running'
"""


def step_inputs(step: Step) -> dict[str, Any]:
    """The results of a step's dependencies, by key, plus what the server added (feedback)."""
    inputs: dict[str, Any] = {
        key: {"final_result": final_result, "outputs": outputs}
        for key, final_result, outputs in Step.objects.filter(downstream_edges__step_id=step.id)
        .order_by("key")
        .values_list("key", "final_result", "outputs")
    }
    inputs.update(step.extra_inputs or {})
    return inputs


def _check_roles(agent: Agent, roles: list[str]) -> None:
    missing = [role for role in roles if role not in agent.roles]
    if missing:
        raise Forbidden(
            f"Agent {agent.name!r} does not hold role(s) {', '.join(missing)}; it holds {', '.join(agent.roles) or 'none'}. "
            "Pull only your roles, or give the agent the role in the admin.",
            roles=missing,
        )


@transaction.atomic
def step_pull(*, agent: Agent, roles: list[str], idempotency_key: str = "") -> Lease | PullMiss:
    """Lease the best ready step of `roles` to `agent`, atomically.

    1. A retried request (same `idempotency_key`) gets its open lease back.
    2. The agent row is locked, so its capacity check and grant are one step.
    3. The oldest ready step of the highest priority is claimed with
       `FOR UPDATE SKIP LOCKED`: concurrent pulls never get the same step.
    4. The step moves to `in_progress` under a new `Attempt`; counters and the
       event log follow in the same transaction.
    """
    _check_roles(agent, roles)
    if idempotency_key:
        previous = (
            Attempt.objects.select_related("step__workflow__project")
            .filter(agent=agent, idempotency_key=idempotency_key)
            .order_by("-started_at")
            .first()
        )
        if previous is not None:
            if previous.ended_at is None and previous.step.lease_attempt_id == previous.id:
                return Lease(step=previous.step, attempt=previous, token=lease_token_for(previous.id),
                             inputs=step_inputs(previous.step))
            raise Conflict(
                f"Idempotency-Key {idempotency_key!r} was used for step {previous.step.key!r}, whose lease has ended; "
                "send a new key with every new pull.",
            )
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM coordination_agent WHERE id = %s FOR UPDATE", [agent.id])
        now = timezone.now()
        passed_over: list[UUID] = []
        blocked_projects: set[UUID] = set()
        for _ in range(MAX_LOCK_BLOCKED_CANDIDATES):
            cursor.execute(_CLAIM_SQL if len(roles) == 1 else _CLAIM_SQL_ROLES, {
                "agent": agent.id, "capacity": agent.capacity, "role": roles[0], "roles": roles, "now": now,
                "passed_over": passed_over})
            held, *row = cursor.fetchone()
            if held >= agent.capacity:
                raise AtCapacity(
                    f"Agent {agent.name!r} holds {held} step(s), its capacity; report or hand back one before "
                    "pulling another.",
                    held=held,
                    capacity=agent.capacity,
                )
            if row[0] is None:
                break
            step, dep_results = _claimed_step(row)
            if step.files and _declared_files_blocked(step=step, agent=agent):
                # Lock-aware scheduling: hand out another step rather than one that would wait.
                passed_over.append(step.id)
                blocked_projects.add(step.workflow.project_id)
                continue
            return _grant(step=step, agent=agent, idempotency_key=idempotency_key, now=now, dep_results=dep_results)
        cursor.execute(_NEXT_AVAILABLE_SQL, [roles, now])
        return PullMiss(next_available_at=cursor.fetchone()[0], blocked_projects=blocked_projects)


def _claimed_step(row: list[Any]) -> tuple[Step, list]:
    """The Step (with its workflow and project, names only) of a `_CLAIM_SQL` row, and its dependencies' results."""
    width = rows.width(Step)
    step = rows.from_row(Step, row[:width])
    workflow_name, project_id, project_name, dep_results = row[width:]
    if isinstance(dep_results, str):
        dep_results = json.loads(dep_results)
    workflow = Workflow(id=step.workflow_id, name=workflow_name, project_id=project_id)
    workflow.project = Project(id=project_id, name=project_name)
    step.workflow = workflow
    return step, dep_results


def _declared_files_by_mode(step: Step) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for file in step.files:
        groups.setdefault(file["mode"], []).append(file["path"])
    return {mode: sorted(paths) for mode, paths in groups.items()}


def _declared_files_blocked(*, step: Step, agent: Agent) -> bool:
    """Whether a step's declared files are held by others (or queued for); takes the project's lock."""
    project_id = step.workflow.project_id
    now = _lock_project(project_id)
    return any(
        _lock_blockers(project_id=project_id, paths=paths, mode=mode, agent_id=agent.id, step_id=step.id,
                       now=now, waiter_id=None)
        for mode, paths in _declared_files_by_mode(step).items()
    )


_GRANT_SQL = """
WITH attempt AS (
    INSERT INTO coordination_attempt (id, step_id, agent_id, number, lease_token_hash, idempotency_key, started_at,
                                      expires_at, ended_at, outcome)
    VALUES (%(attempt)s, %(step)s, %(agent)s, %(number)s, %(hash)s, %(key)s, %(now)s, %(expires)s, NULL, '')
    RETURNING id
), step AS (
    UPDATE coordination_step
    SET status = 'in_progress', attempt = %(number)s, lease_agent_id = %(agent)s, lease_token_hash = %(hash)s,
        lease_expires_at = %(expires)s, lease_attempt_id = %(attempt)s, started_at = coalesce(started_at, %(now)s),
        updated_at = %(now)s
    WHERE id = %(step)s
    RETURNING started_at
), workflow AS (
    UPDATE coordination_workflow
    SET event_seq = event_seq + 1, n_ready = n_ready - 1, n_in_progress = n_in_progress + 1,
        updated_at = statement_timestamp()
    WHERE id = %(workflow)s
    RETURNING event_seq
)
INSERT INTO coordination_event (workflow_id, seq, kind, step_id, agent_id, data, at)
SELECT %(workflow)s, workflow.event_seq, 'step.leased', %(step)s, %(agent)s, %(data)s::jsonb, %(now)s
FROM workflow, step, attempt
RETURNING id, seq, (SELECT started_at FROM step)
"""


def _grant(*, step: Step, agent: Agent, idempotency_key: str, now: datetime, dep_results: list) -> Lease:
    """Lease a claimed step: its attempt, the step's lease, the counters and the event, in one statement."""
    attempt = Attempt(
        step=step,
        agent=agent,
        number=step.attempt + 1,
        idempotency_key=idempotency_key,
        started_at=now,
        expires_at=now + timedelta(seconds=step.lease_ttl_s),
    )
    token = lease_token_for(attempt.id)
    attempt.lease_token_hash = token_hash(token)
    data = {"step": step.key, "agent": agent.name, "attempt": attempt.number, "expires_at": _iso(attempt.expires_at)}
    if step.files:
        # The declared files come with the lease, in the same transaction (the project lock is held).
        lock_now = _db_now()
        locks = []
        for mode, paths in _declared_files_by_mode(step).items():
            locks += _grant_locks(project_id=step.workflow.project_id, paths=paths, mode=mode, agent=agent,
                                  step=step, expires_at=attempt.expires_at, now=lock_now)
        data.update(_lock_event_data(locks))
    with connection.cursor() as cursor:
        cursor.execute(_GRANT_SQL, {
            "attempt": attempt.id, "step": step.id, "agent": agent.id, "number": attempt.number,
            "hash": attempt.lease_token_hash, "key": idempotency_key, "now": now, "expires": attempt.expires_at,
            "workflow": step.workflow_id, "data": json.dumps(data),
        })
        event_id, seq, started_at = cursor.fetchone()
    attempt._state.adding = False
    step.status = StepStatus.IN_PROGRESS
    step.attempt = attempt.number
    step.lease_agent = agent
    step.lease_token_hash = attempt.lease_token_hash
    step.lease_expires_at = attempt.expires_at
    step.lease_attempt = attempt
    step.started_at = started_at
    step.updated_at = now
    event_published(Event(id=event_id, workflow_id=step.workflow_id, seq=seq, kind="step.leased", step_id=step.id,
                           agent_id=agent.id, data=data, at=now))
    inputs = {key: {"final_result": final_result, "outputs": outputs} for key, final_result, outputs in dep_results}
    inputs.update(step.extra_inputs or {})
    return Lease(step=step, attempt=attempt, token=token, inputs=inputs)


@dataclass
class IterationIn:
    index: int
    thought: str = ""
    action: str = ""
    observation: str = ""


_LOCKED_STEP_SQL = f"""
SELECT {rows.select_list(Step, "s")}, {rows.select_list(Workflow, "w")}, {rows.select_list(Attempt, "a")},
       {{replay}}
FROM coordination_step s
JOIN coordination_workflow w ON w.id = s.workflow_id
LEFT JOIN coordination_attempt a ON a.id = s.lease_attempt_id
WHERE s.id = %(step)s
FOR UPDATE OF s
"""
_LOCKED_STEP_SQL_PLAIN = _LOCKED_STEP_SQL.format(replay="NULL")
_LOCKED_STEP_SQL_REPLAY = _LOCKED_STEP_SQL.format(replay="""(
    SELECT r.response FROM coordination_result r JOIN coordination_attempt ra ON ra.id = r.attempt_id
    WHERE r.step_id = s.id AND ra.lease_token_hash = %(hash)s AND ra.agent_id = %(agent)s)""")


def _locked_step(step_id: UUID, *, replay_for: tuple[str, UUID] | None = None) -> Step:
    """The step, locked (`FOR UPDATE`), with its workflow and current attempt.

    `replay_for=(lease token hash, agent id)`: also read the answer already given
    to a report of that lease, as `step.replay` (None if there was none).
    """
    params: dict[str, Any] = {"step": step_id}
    if replay_for is not None:
        params["hash"], params["agent"] = replay_for
    with connection.cursor() as cursor:
        cursor.execute(_LOCKED_STEP_SQL_PLAIN if replay_for is None else _LOCKED_STEP_SQL_REPLAY, params)
        row = cursor.fetchone()
    if row is None:
        raise NotFound(f"Step {step_id} does not exist.")
    n_step, n_workflow, n_attempt = rows.width(Step), rows.width(Workflow), rows.width(Attempt)
    step = rows.from_row(Step, row[:n_step])
    step.workflow = rows.from_row(Workflow, row[n_step:n_step + n_workflow])
    attempt_values = row[n_step + n_workflow:n_step + n_workflow + n_attempt]
    step.lease_attempt = rows.from_row(Attempt, attempt_values) if attempt_values[0] is not None else None
    replay = row[-1]
    step.replay = json.loads(replay) if isinstance(replay, str) else replay
    return step


def _held_attempt(step: Step, agent: Agent, lease_token: str) -> Attempt:
    """The attempt `lease_token` belongs to, if `agent` holds it now; else the right error.

    - never held by this agent: 403;
    - held once but no longer (expired, reassigned, ended): 409 stale_lease.
    """
    hashed = token_hash(lease_token or "")
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


def _lease_live(step: Step, now: datetime) -> bool:
    return step.status == StepStatus.IN_PROGRESS and step.lease_expires_at is not None and step.lease_expires_at > now


_INSERT_ITERATIONS_SQL = """
INSERT INTO coordination_iteration (attempt_id, "index", thought, action, observation, created_at)
SELECT %s, u.i, u.t, u.a, u.o, statement_timestamp()
FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[]) AS u(i, t, a, o)
ON CONFLICT (attempt_id, "index") DO NOTHING
RETURNING "index"
"""


def _store_iterations(attempt: Attempt, iterations: list[IterationIn]) -> list[int]:
    """Store iterations not stored yet (a retried heartbeat repeats some); return the new indexes."""
    unique = {it.index: it for it in iterations}
    if not unique:
        return []
    items = list(unique.values())
    with connection.cursor() as cursor:
        cursor.execute(
            _INSERT_ITERATIONS_SQL,
            [attempt.id, [it.index for it in items], [it.thought for it in items], [it.action for it in items],
             [it.observation for it in items]],
        )
        return sorted(row[0] for row in cursor.fetchall())


@transaction.atomic
def step_heartbeat(*, step_id: UUID, agent: Agent, lease_token: str,
                   iterations: list[IterationIn] | None = None) -> dict[str, Any]:
    """Extend a live lease (and its step's locks); store new reasoning iterations.

    `cancel` is true when the workflow was cancelled or paused: the agent should stop.
    """
    now = timezone.now()
    step = _locked_step(step_id)
    attempt = _held_attempt(step, agent, lease_token)
    workflow = step.workflow
    if step.status == StepStatus.CANCELLED or workflow.status == WorkflowStatus.CANCELLED:
        return {"expires_at": now, "cancel": True}
    if not _lease_live(step, now):
        raise StaleLease(
            f"The lease on step {step.key!r} expired at {step.lease_expires_at:%Y-%m-%dT%H:%M:%SZ}; "
            "drop the work and pull another step.",
            step_status=step.status,
        )
    step.lease_expires_at = now + timedelta(seconds=step.lease_ttl_s)
    step.save(update_fields=["lease_expires_at", "updated_at"])
    lock_renew_for_step(step=step, expires_at=step.lease_expires_at)
    added = _store_iterations(attempt, iterations or [])
    if added:
        snapshot = _workflow_move(step.workflow_id, {})
        event_record_many([
            _event(snapshot.seqs(), "step.progress", workflow_id=step.workflow_id, step=step, agent_id=agent.id,
                   data={"attempt": attempt.number, "iterations": added})
        ])
    return {"expires_at": step.lease_expires_at, "cancel": workflow.status == WorkflowStatus.PAUSED}


@dataclass
class Outcome:
    status: str  # "completed" or "failed"
    final_result: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    iterations: list[IterationIn] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    execution_time_s: float | None = None
    error: str = ""
    retryable: bool = False


_RELEASE_DEPENDENTS_SQL = """
UPDATE coordination_step s
SET remaining_deps = s.remaining_deps - 1,
    status = CASE WHEN s.remaining_deps = 1 THEN 'ready' ELSE s.status END,
    available_at = CASE WHEN s.remaining_deps = 1 THEN %s ELSE s.available_at END,
    updated_at = %s
FROM coordination_stepdependency e
WHERE e.depends_on_id = %s AND s.id = e.step_id AND s.status = 'pending'
RETURNING s.key, s.status, s.role
"""

_SKIP_DOWNSTREAM_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT e.step_id FROM coordination_stepdependency e WHERE e.depends_on_id = %s
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
)
UPDATE coordination_step s SET status = 'skipped', finished_at = %s, updated_at = %s
FROM down WHERE s.id = down.id AND s.status = 'pending'
RETURNING s.key
"""


def _end_attempt(attempt: Attempt, outcome: str, now: datetime) -> None:
    Attempt.objects.filter(id=attempt.id).update(ended_at=now, outcome=outcome)
    _end_attempt_in_memory(attempt, outcome, now)


def _end_attempt_in_memory(attempt: Attempt, outcome: str, now: datetime) -> None:
    attempt.ended_at = now
    attempt.outcome = outcome


def _requeue_or_fail(
    *, step: Step, now: datetime, charge: bool, error: str, final: bool = False
) -> tuple[str, list[str], timedelta]:
    """Put a step whose lease ended without success back to `ready` while attempts remain, else fail it.

    `charge=False` hands the attempt back uncharged; `final=True` fails the step
    whatever attempts remain. Returns the new status, the keys of the
    downstream steps skipped, and the backoff.
    """
    if not charge:
        step.attempts_released += 1
    charged = step.attempt - step.attempts_released
    step.lease_agent = None
    step.lease_expires_at = None
    step.lease_attempt = None
    if not final and charged < step.max_attempts:
        backoff = _backoff(charged) if charge else timedelta(0)
        step.status = StepStatus.READY
        step.available_at = now + backoff
        step.error = error
        step.save(update_fields=["status", "available_at", "error", "lease_agent", "lease_expires_at",
                                 "lease_attempt", "attempts_released", "updated_at"])
        notify.notify_ready([step.role])
        return StepStatus.READY, [], backoff
    step.status = StepStatus.FAILED
    step.error = error
    step.finished_at = now
    step.save(update_fields=["status", "error", "finished_at", "lease_agent", "lease_expires_at",
                             "lease_attempt", "attempts_released", "updated_at"])
    with connection.cursor() as cursor:
        cursor.execute(_SKIP_DOWNSTREAM_SQL, [step.id, now, now])
        skipped = [row[0] for row in cursor.fetchall()]
    return StepStatus.FAILED, skipped, timedelta(0)


def step_report(*, step_id: UUID, agent: Agent, lease_token: str, outcome: Outcome) -> dict[str, Any]:
    """Apply a worker's result; release dependents whose last dependency this was.

    Only the current lease's holder may report; a stale report is refused with
    `StaleLease` and recorded as an event (in its own transaction), never applied.
    A repeated report of an applied result returns the first answer and changes
    nothing. The work done depends on the step's own dependents, never on the
    size of the workflow.
    """
    try:
        return _step_report(step_id=step_id, agent=agent, lease_token=lease_token, outcome=outcome)
    except StaleLease as exc:
        step = Step.objects.filter(id=step_id).only("id", "key", "workflow_id").first()
        if step is not None:
            with transaction.atomic():
                event_record(kind="step.stale_report", workflow_id=step.workflow_id, step_id=step.id, agent_id=agent.id,
                             data={"step": step.key, "status": outcome.status, "agent": agent.name,
                                   "step_status": exc.extra.get("step_status")})
        raise


@transaction.atomic
def _step_report(*, step_id: UUID, agent: Agent, lease_token: str, outcome: Outcome) -> dict[str, Any]:
    now = timezone.now()
    hashed = token_hash(lease_token or "")
    step = _locked_step(step_id, replay_for=(hashed, agent.id))
    if step.replay is not None:
        return step.replay
    try:
        attempt = _held_attempt(step, agent, lease_token)
    except StaleLease:
        # A report of the same lease may have committed while this one waited for the step's lock.
        replay = Result.objects.filter(step=step, attempt__lease_token_hash=hashed, attempt__agent=agent).first()
        if replay is not None:
            return replay.response
        raise
    if not _lease_live(step, now):
        ended = "expired" if step.status == StepStatus.IN_PROGRESS else step.status
        raise StaleLease(
            f"The lease on step {step.key!r} ended ({ended}); the result was not applied.", step_status=step.status
        )

    _store_iterations(attempt, outcome.iterations)
    return _finish_step(step=step, attempt=attempt, outcome=outcome, now=now, from_status=StepStatus.IN_PROGRESS,
                        actor={"agent": agent.name}, agent_id=agent.id)


_COMPLETE_SQL = """
WITH attempt AS (
    UPDATE coordination_attempt SET ended_at = %(now)s, outcome = 'completed' WHERE id = %(attempt)s RETURNING id
), step AS (
    UPDATE coordination_step
    SET status = 'completed', final_result = %(final_result)s, outputs = %(outputs)s::jsonb, error = '',
        finished_at = %(now)s, lease_agent_id = NULL, lease_expires_at = NULL, lease_attempt_id = NULL,
        updated_at = %(now)s
    WHERE id = %(step)s
    RETURNING id
), released AS (
    UPDATE coordination_step s
    SET remaining_deps = s.remaining_deps - 1,
        status = CASE WHEN s.remaining_deps = 1 THEN 'ready' ELSE s.status END,
        available_at = CASE WHEN s.remaining_deps = 1 THEN %(now)s ELSE s.available_at END,
        updated_at = %(now)s
    FROM coordination_stepdependency e
    WHERE e.depends_on_id = %(step)s AND s.id = e.step_id AND s.status = 'pending'
    RETURNING s.key, s.status, s.role
), ready AS (
    SELECT coalesce(array_agg(key ORDER BY key), '{{}}') AS keys, coalesce(array_agg(DISTINCT role), '{{}}') AS roles,
           count(*) AS n
    FROM released WHERE status = 'ready'
), locks AS (
    UPDATE coordination_filelock l
    SET released_at = LEAST(clock_timestamp(), l.expires_at), release_reason = 'completed'
    WHERE l.step_id = %(step)s AND l.released_at IS NULL
    RETURNING l.project_id, l.agent_id, l.path, l.mode, l.fencing
), workflow AS (
    UPDATE coordination_workflow w
    SET event_seq = event_seq + 1 + (ready.n > 0)::int, {counter_sets},
        spent_usd = spent_usd + %(usd)s, spent_tokens = spent_tokens + %(tokens)s, updated_at = statement_timestamp()
    FROM ready
    WHERE w.id = %(workflow)s
    RETURNING w.event_seq, w.status, w.total_steps, w.spent_usd, w.spent_tokens, w.budget_usd, w.budget_tokens,
              {counter_columns}, ready.keys, ready.roles, ready.n
), settled AS (
    -- `_settled_status`, then the budget pause of `_finish_step`, for the stored answer
    SELECT CASE
        WHEN w.status NOT IN ('running', 'paused') THEN w.status
        WHEN w.n_completed = w.total_steps AND w.total_steps > 0 THEN 'completed'
        WHEN w.n_ready = 0 AND w.n_in_progress = 0 THEN 'failed'
        WHEN w.status = 'running' AND ((w.budget_usd IS NOT NULL AND w.spent_usd >= w.budget_usd)
                                       OR (w.budget_tokens IS NOT NULL AND w.spent_tokens >= w.budget_tokens))
            THEN 'paused'
        ELSE w.status END AS status
    FROM workflow w
), events AS (
    INSERT INTO coordination_event (workflow_id, seq, kind, step_id, agent_id, data, at)
    SELECT %(workflow)s, w.event_seq - (w.n > 0)::int, 'step.completed', %(step)s, %(agent)s::uuid,
           %(data)s::jsonb, %(now)s
    FROM workflow w
    UNION ALL
    SELECT %(workflow)s, w.event_seq, 'steps.released', NULL, NULL,
           jsonb_build_object('steps', to_jsonb(w.keys), 'by', %(key)s::text), %(now)s
    FROM workflow w WHERE w.n > 0
    RETURNING id, seq
), result AS (
    INSERT INTO coordination_result (id, attempt_id, step_id, status, final_result, outputs, error, retryable, model,
                                     prompt_tokens, completion_tokens, cost_usd, execution_time_s, response, created_at)
    SELECT %(result)s, %(attempt)s, %(step)s, 'completed', %(final_result)s, %(outputs)s::jsonb, '', false, %(model)s,
           %(prompt_tokens)s, %(completion_tokens)s, %(usd)s, %(execution_time_s)s,
           jsonb_build_object('step_id', %(step)s::text, 'status', 'completed', 'workflow_status', settled.status,
                              'released', to_jsonb(w.keys)),
           %(now)s
    FROM workflow w, settled
    RETURNING id
)
SELECT workflow.*, settled.status,
       (SELECT count(pg_notify('{ready_channel}', r)) FROM unnest(workflow.roles) AS r),
       (SELECT coalesce(json_agg(json_build_array(project_id, agent_id, path, mode, fencing)), '[]') FROM locks),
       (SELECT json_agg(json_build_array(id, seq)) FROM events)
FROM workflow, settled, attempt, step, result
"""


def _complete_sql(from_status: str) -> str:
    deltas = {STEP_COUNTER_FIELDS[from_status]: "- 1", STEP_COUNTER_FIELDS[StepStatus.COMPLETED]: "+ 1"}
    for status, sign in ((StepStatus.PENDING, "-"), (StepStatus.READY, "+")):
        column = STEP_COUNTER_FIELDS[status]
        deltas[column] = f"{deltas.get(column, '')} {sign} ready.n".strip()
    return _COMPLETE_SQL.format(
        counter_sets=", ".join(f"{column} = w.{column} {delta}" for column, delta in deltas.items()),
        counter_columns=", ".join(f"w.{column}" for column in _COUNTER_COLUMNS),
        ready_channel=notify.STEP_READY,
    )


_COMPLETE_SQL_BY_STATUS = {status: _complete_sql(status) for status in (StepStatus.IN_PROGRESS, StepStatus.READY)}


def _complete_in_db(*, step: Step, attempt: Attempt, outcome: Outcome, now: datetime, from_status: str,
                    actor: dict[str, Any], agent_id: UUID | None) -> tuple[WorkflowSnapshot, list[str], list, str]:
    """Complete a step in one statement, so the workflow row (every pull and report of the workflow takes it)
    is held only from this statement to the commit: the attempt and the step, the dependents it releases
    (with their NOTIFY), its locks, the workflow's counters, spend and event numbers, the events, and the
    `Result` with the answer a repeated report gets.

    Returns the workflow as left, the keys released, the locks released, and the workflow status stored in
    the answer."""
    usage = outcome.usage
    data = {"step": step.key, **actor, "attempt": attempt.number, "status": StepStatus.COMPLETED}
    with connection.cursor() as cursor:
        cursor.execute(_COMPLETE_SQL_BY_STATUS[from_status], {
            "now": now, "attempt": attempt.id, "step": step.id, "workflow": step.workflow_id, "key": step.key,
            "agent": agent_id, "data": json.dumps(data), "result": uuid4(),
            "final_result": outcome.final_result, "outputs": json.dumps(outcome.outputs),
            "usd": usage.cost_usd, "tokens": usage.prompt_tokens + usage.completion_tokens, "model": usage.model,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "execution_time_s": outcome.execution_time_s,
        })
        row = cursor.fetchone()
    (last_seq, status, total, spent_usd, spent_tokens, budget_usd, budget_tokens, *rest) = row
    counts = rest[:len(_COUNTER_COLUMNS)]
    released_keys, _roles, n_released, stored_status, _notified, lock_rows, event_rows = rest[len(_COUNTER_COLUMNS):]
    snapshot = WorkflowSnapshot(
        id=step.workflow_id, status=status, total_steps=total, counts=dict(zip(STEP_COUNTER_FIELDS.keys(), counts)),
        first_seq=last_seq - bool(n_released),
        last_seq=last_seq, spent_usd=spent_usd, spent_tokens=spent_tokens,
        budget_usd=budget_usd, budget_tokens=budget_tokens,
    )
    _end_attempt_in_memory(attempt, AttemptOutcome.COMPLETED, now)
    step.status = StepStatus.COMPLETED
    step.final_result = outcome.final_result
    step.outputs = outcome.outputs
    step.error = ""
    step.finished_at = now
    step.updated_at = now
    released = list(released_keys)
    ids = dict((seq, event_id) for event_id, seq in (json.loads(event_rows) if isinstance(event_rows, str)
                                                     else event_rows))
    events = [Event(id=ids[snapshot.first_seq], workflow_id=step.workflow_id, seq=snapshot.first_seq,
                    kind="step.completed", step_id=step.id, agent_id=agent_id, data=data, at=now)]
    if released:
        events.append(Event(id=ids[last_seq], workflow_id=step.workflow_id, seq=last_seq, kind="steps.released",
                            data={"steps": released, "by": step.key}, at=now))
    for event in events:
        event._state.adding = False
        event_published(event)
    if isinstance(lock_rows, str):
        lock_rows = json.loads(lock_rows)
    return snapshot, released, lock_rows, stored_status


def _finish_step(*, step: Step, attempt: Attempt, outcome: Outcome, now: datetime, from_status: str,
                 actor: dict[str, Any], agent_id: UUID | None) -> dict[str, Any]:
    """Apply an outcome to a step (an agent's report, or a person's decision on an approval step)."""
    step.lease_agent = None
    step.lease_expires_at = None
    step.lease_attempt = None
    if outcome.status == StepStatus.COMPLETED:
        snapshot, released, lock_rows, stored_status = _complete_in_db(
            step=step, attempt=attempt, outcome=outcome, now=now, from_status=from_status, actor=actor,
            agent_id=agent_id)
        answer_status, pause_reason = _workflow_after(snapshot)
        response = {"step_id": str(step.id), "status": step.status, "workflow_status": answer_status,
                    "released": released}
        if stored_status != answer_status:
            # The statement's reading of the workflow must agree with `_settled_status`; if it ever does not,
            # the stored answer follows Python's.
            logger.error("Stored workflow status %s differs from %s for step %s; correcting the stored answer.",
                         stored_status, answer_status, step.id)
            Result.objects.filter(attempt=attempt).update(response=response)
        if lock_rows:
            _record_locks_released(lock_rows, workflow_id=step.workflow_id, step_id=step.id, reason=outcome.status)
    else:
        usage = outcome.usage
        moves: dict[str, int] = {from_status: -1}
        _end_attempt(attempt, AttemptOutcome.RETRY if outcome.retryable else AttemptOutcome.FAILED, now)
        new_status, skipped, _ = _requeue_or_fail(
            step=step, now=now, charge=True, error=outcome.error or "Reported failed.", final=not outcome.retryable
        )
        _add(moves, new_status, 1)
        _add(moves, StepStatus.PENDING, -len(skipped))
        _add(moves, StepStatus.SKIPPED, len(skipped))
        lock_release_for_step(step=step, reason=outcome.status)
        snapshot = _workflow_move(step.workflow_id, moves, events=1 + bool(skipped), spent_usd=usage.cost_usd,
                                  spent_tokens=usage.prompt_tokens + usage.completion_tokens)
        seqs = snapshot.seqs()
        data = {**actor, "attempt": attempt.number, "status": step.status, "error": outcome.error[:500]}
        if step.status == StepStatus.READY:
            data["available_at"] = step.available_at.isoformat()
        kind = "step.retrying" if new_status == StepStatus.READY else "step.failed"
        events = [_event(seqs, kind, workflow_id=step.workflow_id, step=step, agent_id=agent_id, data=data)]
        if skipped:
            events.append(_event(seqs, "steps.skipped", workflow_id=step.workflow_id,
                                 data={"steps": skipped, "after": step.key}))
        answer_status, pause_reason = _workflow_after(snapshot)
        response = {"step_id": str(step.id), "status": step.status, "workflow_status": answer_status,
                    "released": []}
        _insert_events_and_result(events, step=step, attempt=attempt, outcome=outcome, response=response, now=now)
    # What the workflow became is in the answer already; these writes make it so, after the step's own events.
    _settle_workflow(snapshot)
    if pause_reason:
        # Running agents learn it from their next heartbeat (cancel: true).
        workflow_pause(workflow_id=step.workflow_id, reason=pause_reason)
    return response


def _workflow_after(snapshot: WorkflowSnapshot) -> tuple[str, str]:
    """The workflow's status once a step has finished (settled, or paused over budget), and why it pauses."""
    status = _settled_status(snapshot)
    over_budget = snapshot.budget_exceeded()
    if over_budget and status == WorkflowStatus.RUNNING:
        return WorkflowStatus.PAUSED, over_budget
    return status, ""


_EVENTS_AND_RESULT_SQL = """
WITH result AS (
    INSERT INTO coordination_result (id, attempt_id, step_id, status, final_result, outputs, error, retryable, model,
                                     prompt_tokens, completion_tokens, cost_usd, execution_time_s, response, created_at)
    VALUES (%(id)s, %(attempt)s, %(step)s, %(status)s, %(final_result)s, %(outputs)s::jsonb, %(error)s, %(retryable)s,
            %(model)s, %(prompt_tokens)s, %(completion_tokens)s, %(cost_usd)s, %(execution_time_s)s,
            %(response)s::jsonb, %(now)s)
    RETURNING id
)
INSERT INTO coordination_event (workflow_id, seq, kind, step_id, agent_id, data, at)
SELECT %(workflow)s, u.seq, u.kind, u.step_id, u.agent_id, u.data, %(now)s
FROM unnest(%(seqs)s::bigint[], %(kinds)s::text[], %(step_ids)s::uuid[], %(agent_ids)s::uuid[], %(datas)s::jsonb[])
     AS u(seq, kind, step_id, agent_id, data), result
ORDER BY u.seq
RETURNING id, seq
"""


def _insert_events_and_result(events: list[Event], *, step: Step, attempt: Attempt, outcome: Outcome,
                              response: dict[str, Any], now: datetime) -> None:
    """Store a finished step's events and its `Result` (the answer a repeated report gets) in one statement."""
    usage = outcome.usage
    with connection.cursor() as cursor:
        cursor.execute(_EVENTS_AND_RESULT_SQL, {
            "id": uuid4(), "attempt": attempt.id, "step": step.id, "status": outcome.status,
            "final_result": outcome.final_result, "outputs": json.dumps(outcome.outputs), "error": outcome.error,
            "retryable": outcome.retryable, "model": usage.model, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "cost_usd": usage.cost_usd,
            "execution_time_s": outcome.execution_time_s, "response": json.dumps(response), "now": now,
            "workflow": step.workflow_id, "seqs": [event.seq for event in events],
            "kinds": [event.kind for event in events], "step_ids": [event.step_id for event in events],
            "agent_ids": [event.agent_id for event in events],
            "datas": [json.dumps(event.data) for event in events],
        })
        ids = dict((seq, event_id) for event_id, seq in cursor.fetchall())
    for event in events:
        event.id = ids[event.seq]
        event.at = now
        event._state.adding = False
        event_published(event)


@transaction.atomic
def step_release(*, step_id: UUID, agent: Agent, lease_token: str) -> dict[str, Any]:
    """Hand a held step back without charging an attempt (a worker shutting down, a paused workflow)."""
    now = timezone.now()
    step = _locked_step(step_id)
    attempt = _held_attempt(step, agent, lease_token)
    if not _lease_live(step, now):
        raise StaleLease(f"The lease on step {step.key!r} has already ended.", step_status=step.status)
    _end_attempt(attempt, AttemptOutcome.RELEASED, now)
    new_status, _, _ = _requeue_or_fail(step=step, now=now, charge=False, error="")
    lock_release_for_step(step=step, reason="released")
    snapshot = _workflow_move(step.workflow_id, {StepStatus.IN_PROGRESS: -1, new_status: +1})
    event_record_many([_event(snapshot.seqs(), "step.handed_back", workflow_id=step.workflow_id, step=step,
                              agent_id=agent.id, data={"agent": agent.name, "attempt": attempt.number})])
    return {"step_id": str(step.id), "status": step.status}


@transaction.atomic
def lease_expire(*, step_id: UUID) -> str | None:
    """End a lease that ran out: back to `ready` after a backoff while attempts remain, else `failed`.

    Re-checked under the row lock, so a heartbeat that arrived in time wins. In
    a paused workflow the attempt is not charged. Returns the new status, or
    None when there was nothing to expire.
    """
    now = timezone.now()
    step = (
        Step.objects.select_for_update(of=("self",), skip_locked=True)
        .select_related("workflow", "lease_attempt", "lease_agent")
        .filter(id=step_id, status=StepStatus.IN_PROGRESS, lease_expires_at__lte=now)
        .first()
    )
    if step is None:
        return None
    attempt = step.lease_attempt
    agent = step.lease_agent
    if attempt is not None:
        _end_attempt(attempt, AttemptOutcome.EXPIRED, now)
    paused = step.workflow.status == WorkflowStatus.PAUSED
    new_status, skipped, backoff = _requeue_or_fail(
        step=step, now=now, charge=not paused,
        error="" if paused else f"The lease of attempt {step.attempt} expired (no heartbeat).",
    )
    lock_release_for_step(step=step, reason="lease_expired")
    moves = {StepStatus.IN_PROGRESS: -1}
    _add(moves, new_status, 1)
    _add(moves, StepStatus.PENDING, -len(skipped))
    _add(moves, StepStatus.SKIPPED, len(skipped))
    snapshot = _workflow_move(step.workflow_id, moves, events=1 + bool(skipped))
    seqs = snapshot.seqs()
    events = [_event(seqs, "step.lease_expired", workflow_id=step.workflow_id, step=step,
                     agent_id=agent.id if agent else None,
                     data={"agent": agent.name if agent else None, "attempt": step.attempt, "status": new_status,
                           "backoff_s": backoff.total_seconds()})]
    if skipped:
        events.append(_event(seqs, "steps.skipped", workflow_id=step.workflow_id, data={"steps": skipped, "after": step.key}))
    event_record_many(events)
    _settle_workflow(snapshot)
    return new_status


def leases_sweep(*, limit: int = 1000) -> int:
    """Expire every lease past its end (Celery beat); each in its own short transaction."""
    now = timezone.now()
    ids = list(
        Step.objects.filter(status=StepStatus.IN_PROGRESS, lease_expires_at__lte=now)
        .order_by("lease_expires_at")
        .values_list("id", flat=True)[:limit]
    )
    return sum(1 for step_id in ids if lease_expire(step_id=step_id) is not None)


# --- workflow control -------------------------------------------------------


def _actor(user: AbstractBaseUser | None, agent: Agent | None) -> dict[str, str]:
    if agent is not None:
        return {"by_agent": agent.name}
    if user is not None and user.is_authenticated:
        return {"by_user": user.get_username()}
    return {"by": "system"}


def _locked_workflow(workflow_id: UUID) -> Workflow:
    workflow = Workflow.objects.select_for_update().filter(id=workflow_id).first()
    if workflow is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return workflow


_CANCEL_STEPS_SQL = """
WITH old AS (
    SELECT id, status FROM coordination_step
    WHERE workflow_id = %s AND status IN ('pending', 'ready', 'in_progress')
    FOR UPDATE
)
UPDATE coordination_step s
SET status = 'cancelled', finished_at = %s, updated_at = %s, lease_expires_at = NULL
FROM old WHERE s.id = old.id
RETURNING old.status, s.id
"""


@transaction.atomic
def workflow_cancel(*, workflow_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Workflow:
    """Cancel a workflow: every step not finished is cancelled; running agents learn it from their heartbeat."""
    now = timezone.now()
    workflow = _locked_workflow(workflow_id)
    if workflow.status in TERMINAL_WORKFLOW_STATUSES:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status} already; only a live workflow can be cancelled.")
    with connection.cursor() as cursor:
        cursor.execute(_CANCEL_STEPS_SQL, [workflow.id, now, now])
        rows = cursor.fetchall()
    moves: dict[str, int] = {StepStatus.CANCELLED: len(rows)}
    for old_status, _ in rows:
        _add(moves, old_status, -1)
    step_ids = [step_id for _, step_id in rows]
    Attempt.objects.filter(step_id__in=step_ids, ended_at__isnull=True).update(ended_at=now, outcome=AttemptOutcome.CANCELLED)
    lock_release_for_steps(step_ids=step_ids, reason="cancelled")
    snapshot = _workflow_move(workflow.id, moves)
    Workflow.objects.filter(id=workflow.id).update(status=WorkflowStatus.CANCELLED, finished_at=now, paused_reason="")
    event_record_many([_event(snapshot.seqs(), "workflow.cancelled", workflow_id=workflow.id,
                              agent_id=agent.id if agent else None,
                              data={"cancelled_steps": len(rows), **_actor(user, agent)})])
    workflow.refresh_from_db()
    return workflow


@transaction.atomic
def workflow_pause(*, workflow_id: UUID, reason: str = "", user: AbstractBaseUser | None = None,
                   agent: Agent | None = None) -> Workflow:
    """Hand out no new steps; running agents are asked to stop through their heartbeat."""
    workflow = _locked_workflow(workflow_id)
    if workflow.status == WorkflowStatus.PAUSED:
        return workflow
    if workflow.status != WorkflowStatus.RUNNING:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}; only a running workflow can be paused.")
    actor = _actor(user, agent)
    workflow.status = WorkflowStatus.PAUSED
    workflow.paused_reason = reason or f"paused by {next(iter(actor.values()))}"
    workflow.save(update_fields=["status", "paused_reason", "updated_at"])
    event_record(kind="workflow.paused", workflow_id=workflow.id, agent_id=agent.id if agent else None,
                 data={"reason": workflow.paused_reason, **actor})
    return workflow


@transaction.atomic
def workflow_resume(*, workflow_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Workflow:
    workflow = _locked_workflow(workflow_id)
    if workflow.status == WorkflowStatus.RUNNING:
        return workflow
    if workflow.status != WorkflowStatus.PAUSED:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}; only a paused workflow can be resumed.")
    workflow.status = WorkflowStatus.RUNNING
    workflow.paused_reason = ""
    workflow.save(update_fields=["status", "paused_reason", "updated_at"])
    notify.notify_ready(
        Step.objects.filter(workflow=workflow, status=StepStatus.READY).values_list("role", flat=True).distinct()
    )
    event_record(kind="workflow.resumed", workflow_id=workflow.id, agent_id=agent.id if agent else None,
                 data=_actor(user, agent))
    return workflow


_UNSKIP_DOWNSTREAM_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT e.step_id FROM coordination_stepdependency e WHERE e.depends_on_id = %s
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
)
UPDATE coordination_step s SET status = 'pending', finished_at = NULL, updated_at = %s
FROM down WHERE s.id = down.id AND s.status = 'skipped'
RETURNING s.key
"""


@transaction.atomic
def step_retry(*, step_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Step:
    """A failed or cancelled step back to `ready` with fresh attempts; its skipped dependents back to `pending`."""
    now = timezone.now()
    step = _locked_step(step_id)
    workflow = _locked_workflow(step.workflow_id)
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
        cursor.execute(_UNSKIP_DOWNSTREAM_SQL, [step.id, now])
        unskipped = [row[0] for row in cursor.fetchall()]
    moves: dict[str, int] = {}
    _add(moves, old_status, -1)
    _add(moves, step.status, 1)
    _add(moves, StepStatus.SKIPPED, -len(unskipped))
    _add(moves, StepStatus.PENDING, len(unskipped))
    snapshot = _workflow_move(step.workflow_id, moves)
    if workflow.status in TERMINAL_WORKFLOW_STATUSES:
        Workflow.objects.filter(id=workflow.id).update(status=WorkflowStatus.RUNNING, finished_at=None, failure_reason="")
    if step.status == StepStatus.READY:
        notify.notify_ready([step.role])
    event_record_many([_event(snapshot.seqs(), "step.retried", workflow_id=step.workflow_id, step=step,
                              agent_id=agent.id if agent else None,
                              data={"from": old_status, "unskipped": unskipped, **_actor(user, agent)})])
    step.refresh_from_db()
    return step


# --- agents' presence ---------------------------------------------------------


def agent_seen(*, agent: Agent, now: datetime | None = None) -> None:
    """Record that an agent called the API; written at most every few seconds per agent."""
    now = now or timezone.now()
    if agent.last_seen_at is None or (now - agent.last_seen_at).total_seconds() >= 5:
        Agent.objects.filter(id=agent.id).update(last_seen_at=now)
        agent.last_seen_at = now


# --- file locks -------------------------------------------------------------
#
# A lock is granted under a transaction-scoped advisory lock per project, so two
# requests for overlapping paths (`src/` and `src/app.py`) are decided one after
# the other. Timestamps of grants and releases come from the database clock read
# after that lock, so the stored history orders grants exactly as they happened.

MAX_PATHS_PER_REQUEST = 200
LOCK_TTL_DEFAULT_S = 300
LOCK_TTL_MAX_S = 3600
LOCK_WAIT_MAX_S = 30


@dataclass
class LockBlocker:
    path: str
    mode: str
    held_by: str | None
    step_id: UUID | None
    expires_at: datetime
    queued: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "mode": self.mode,
            "held_by": self.held_by,
            "step_id": str(self.step_id) if self.step_id else None,
            "expires_at": _iso(self.expires_at),
            **({"queued": True} if self.queued else {}),
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(dt_timezone.utc).isoformat().replace("+00:00", "Z")


def _advisory_key(project_id: UUID) -> int:
    value = project_id.int >> 64
    return value - (1 << 64) if value >= (1 << 63) else value


def _lock_project(project_id: UUID) -> datetime:
    """Serialise lock decisions in a project; return the database clock read after the lock."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s), clock_timestamp()", [_advisory_key(project_id)])
        return cursor.fetchone()[1]


def _db_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def normalise_paths(raw_paths: list[Any]) -> list[str]:
    if not isinstance(raw_paths, list) or not raw_paths:
        raise InvalidRequest("Give at least one path in `paths`.")
    if len(raw_paths) > MAX_PATHS_PER_REQUEST:
        raise InvalidRequest(f"At most {MAX_PATHS_PER_REQUEST} paths per request; split it up.")
    return sorted({normalise_path(raw) for raw in raw_paths})


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _overlap_candidates(paths: list[str]) -> tuple[list[str], list[str]]:
    """Paths a live lock may have to overlap `paths` (exact values and LIKE prefixes), for an indexed query."""
    exact = {"./"}
    prefixes: list[str] = []
    for path in paths:
        exact.add(path)
        if path == "./":
            prefixes.append("%")
            continue
        if path.endswith("/"):
            exact.add(path[:-1])
            prefixes.append(_like_escape(path) + "%")
        else:
            exact.add(path + "/")
        parts = path.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            exact.add("/".join(parts[:depth]) + "/")
    return sorted(exact), prefixes


def _modes_conflict(a: str, b: str) -> bool:
    return a == LockMode.WRITE or b == LockMode.WRITE


def _lock_blockers(
    *, project_id: UUID, paths: list[str], mode: str, agent_id: UUID | None, step_id: UUID | None,
    now: datetime, waiter_id: int | None,
) -> list[LockBlocker]:
    """Live locks, and requests queued ahead, that stop `paths` being granted in `mode` to this holder.

    A holder is (agent, step): an agent's locks never block each other, except
    across its different steps, which may run at the same time.
    """
    from coordination.models import LockWaiter

    exact, prefixes = _overlap_candidates(paths)
    blockers: list[LockBlocker] = []
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT l.path, l.mode, l.agent_id, a.name, l.step_id, l.expires_at
            FROM coordination_filelock l LEFT JOIN coordination_agent a ON a.id = l.agent_id
            WHERE l.project_id = %s AND l.released_at IS NULL AND l.expires_at > %s
              AND (l.path = ANY(%s::text[]) OR l.path LIKE ANY(%s::text[]))
            ORDER BY l.path, l.acquired_at
            """,
            [project_id, now, exact, prefixes],
        )
        for path, held_mode, held_agent, name, held_step, expires in cursor.fetchall():
            if held_agent == agent_id and held_step == step_id:
                continue
            if _modes_conflict(mode, held_mode) and any(paths_overlap(path, mine) for mine in paths):
                blockers.append(LockBlocker(path, held_mode, name, held_step, expires))
    waiters = LockWaiter.objects.filter(project_id=project_id, expires_at__gt=now).select_related("agent")
    if waiter_id is not None:
        waiters = waiters.filter(id__lt=waiter_id)
    for waiter in waiters.order_by("id"):
        if waiter.agent_id == agent_id and waiter.step_id == step_id:
            continue
        if not _modes_conflict(mode, waiter.mode):
            continue
        for path in waiter.paths:
            if any(paths_overlap(path, mine) for mine in paths):
                blockers.append(LockBlocker(path, waiter.mode, waiter.agent.name if waiter.agent else None,
                                            waiter.step_id, waiter.expires_at, queued=True))
                break
    return blockers


def _grant_locks(
    *, project_id: UUID, paths: list[str], mode: str, agent: Agent | None, step: Step | None,
    expires_at: datetime, now: datetime,
):
    """Insert the grants with fencing numbers larger than any before them for their paths."""
    from coordination.models import FileLock

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO coordination_lockfence (project_id, path, last)
            SELECT %s, p, 1 FROM unnest(%s::text[]) AS p
            ON CONFLICT (project_id, path) DO UPDATE SET last = coordination_lockfence.last + 1
            RETURNING path, last
            """,
            [project_id, paths],
        )
        fencing = dict(cursor.fetchall())
    locks = [
        FileLock(project_id=project_id, path=path, mode=mode, agent=agent, step=step, fencing=fencing[path],
                 acquired_at=now, expires_at=expires_at)
        for path in paths
    ]
    FileLock.objects.bulk_create(locks)
    return locks


def _lock_event_data(locks) -> dict[str, Any]:
    return {"locks": [{"path": lock.path, "mode": lock.mode, "fencing": lock.fencing} for lock in locks]}


@dataclass
class LockAttempt:
    granted: list | None
    blockers: list[LockBlocker]
    project_id: UUID


@transaction.atomic
def _locks_try(
    *, agent: Agent, project_name: str | None, paths: list[str], mode: str, step_id: UUID | None,
    lease_token: str | None, ttl_s: int, waiter_id: int | None,
) -> LockAttempt:
    step = None
    if step_id is not None:
        step = _locked_step(step_id)
        _held_attempt(step, agent, lease_token or "")
        if not _lease_live(step, timezone.now()):
            raise StaleLease(f"The lease on step {step.key!r} has ended; its locks cannot be taken.",
                             step_status=step.status)
        project = Project.objects.get(id=step.workflow.project_id)
        if project_name and project_name != project.name:
            raise InvalidRequest(
                f"Step {step.key!r} works in project {project.name!r}, not {project_name!r}; omit `project` or fix it."
            )
    else:
        name = project_name or "default"
        project = project_get_or_create(name=name) if name == "default" else Project.objects.filter(name=name).first()
        if project is None:
            raise NotFound(f"Project {project_name!r} does not exist: check the name (workflows create projects).")
    now = _lock_project(project.id)
    blockers = _lock_blockers(project_id=project.id, paths=paths, mode=mode, agent_id=agent.id,
                              step_id=step.id if step else None, now=now, waiter_id=waiter_id)
    if blockers:
        return LockAttempt(granted=None, blockers=blockers, project_id=project.id)
    expires_at = step.lease_expires_at if step is not None else now + timedelta(seconds=ttl_s)
    locks = _grant_locks(project_id=project.id, paths=paths, mode=mode, agent=agent, step=step,
                         expires_at=expires_at, now=now)
    event_record(kind="locks.granted", workflow_id=step.workflow_id if step else None,
                 step_id=step.id if step else None, agent_id=agent.id,
                 data={"project": project.name, "agent": agent.name, **_lock_event_data(locks)})
    return LockAttempt(granted=locks, blockers=[], project_id=project.id)


def locks_acquire(
    *, agent: Agent, paths: list[Any], mode: str, project_name: str | None = None, step_id: UUID | None = None,
    lease_token: str | None = None, ttl_s: int | None = None, wait_s: float = 0,
    release_connection=None,
) -> list:
    """Grant all `paths` in `mode` to `agent`, or none (`LockConflict` naming the blockers).

    With `wait_s`, the request queues (a `LockWaiter` row) and waits for the
    blockers to go, holding no transaction: it re-checks when a lock of the
    project is released (NOTIFY) or the first blocker expires. Requests queued
    earlier for overlapping paths go first, so readers cannot starve a writer.
    Under a step lease (`step_id` + `lease_token`) the locks follow the lease:
    they expire with it, heartbeats renew them and the step's end releases them.
    """
    from coordination.models import LockWaiter

    if mode not in LockMode.values:
        raise InvalidRequest(f"mode {mode!r} is not 'read' or 'write'.")
    if (step_id is None) != (lease_token is None):
        raise InvalidRequest("Give `step_id` and `lease_token` together (a lock under a step lease), or neither.")
    normalised = normalise_paths(paths)
    ttl = ttl_s or LOCK_TTL_DEFAULT_S
    if not 1 <= ttl <= LOCK_TTL_MAX_S:
        raise InvalidRequest(f"ttl_s={ttl} is out of range 1..{LOCK_TTL_MAX_S}.")
    if not 0 <= wait_s <= LOCK_WAIT_MAX_S:
        raise InvalidRequest(f"wait_s={wait_s} is out of range 0..{LOCK_WAIT_MAX_S}.")
    deadline = _monotonic() + wait_s
    waiter_row: LockWaiter | None = None
    waiter = None
    try:
        while True:
            attempt = _locks_try(agent=agent, project_name=project_name, paths=normalised, mode=mode,
                                 step_id=step_id, lease_token=lease_token, ttl_s=ttl,
                                 waiter_id=waiter_row.id if waiter_row else None)
            if attempt.granted is not None:
                return attempt.granted
            remaining = deadline - _monotonic()
            if remaining <= 0:
                first = attempt.blockers[0]
                who = f"{first.held_by or 'another holder'}{' (queued ahead)' if first.queued else ''}"
                raise LockConflict(
                    f"{first.path} is held ({first.mode}) by {who} until {_iso(first.expires_at)}: "
                    "pick another step, wait (wait_s), or retry later.",
                    conflicts=[blocker.as_dict() for blocker in attempt.blockers],
                )
            if waiter_row is None:
                from coordination import notify as _notify_module

                waiter = _notify_module.listener.register(_notify_module.LOCKS, [attempt.project_id])
                now = _db_now()
                waiter_row = LockWaiter.objects.create(
                    project_id=attempt.project_id, paths=normalised, mode=mode, agent=agent, step_id=step_id,
                    created_at=now, expires_at=now + timedelta(seconds=remaining + 1),
                )
                continue  # re-check at once as a queued request
            soonest = min(blocker.expires_at for blocker in attempt.blockers)
            timeout = min(remaining, max(0.01, (soonest - _db_now()).total_seconds()))
            if release_connection is not None:
                release_connection()
            waiter.wait(timeout)
    finally:
        if waiter is not None:
            from coordination import notify as _notify_module

            _notify_module.listener.unregister(waiter)
        if waiter_row is not None:
            with transaction.atomic():
                LockWaiter.objects.filter(id=waiter_row.id).delete()
                # Requests queued behind this one may go now.
                notify.notify_locks([waiter_row.project_id])


def _monotonic() -> float:
    import time

    return time.monotonic()


def _lock_for_update(lock_id: UUID):
    from coordination.models import FileLock

    lock = (
        FileLock.objects.select_for_update(of=("self",))
        .select_related("agent", "project", "step")
        .filter(id=lock_id)
        .first()
    )
    if lock is None:
        raise NotFound(f"Lock {lock_id} does not exist.")
    return lock


def _may_manage_lock(lock, *, agent: Agent | None, user: AbstractBaseUser | None) -> bool:
    if agent is not None:
        return lock.agent_id == agent.id
    return bool(user is not None and user.is_authenticated and user.is_staff)


@transaction.atomic
def lock_release(*, lock_id: UUID, agent: Agent | None = None, user: AbstractBaseUser | None = None,
                 reason: str = "released"):
    """Release a lock: its holder, or staff (a force-release). Releasing a released lock changes nothing."""
    lock = _lock_for_update(lock_id)
    if not _may_manage_lock(lock, agent=agent, user=user):
        raise Forbidden("Only the lock's holder, or staff, may release it.")
    if lock.released_at is not None:
        return lock
    now = _db_now()
    lock.released_at = min(now, lock.expires_at)
    lock.release_reason = (reason if agent is not None else "forced")[:32]
    lock.save(update_fields=["released_at", "release_reason"])
    notify.notify_locks([lock.project_id])
    event_record(kind="locks.released", workflow_id=lock.step.workflow_id if lock.step else None,
                 step_id=lock.step_id, agent_id=lock.agent_id,
                 data={"project": lock.project.name, "reason": lock.release_reason, **_actor(user, agent),
                       **_lock_event_data([lock])})
    return lock


@transaction.atomic
def lock_renew(*, lock_id: UUID, ttl_s: int, agent: Agent | None = None, user: AbstractBaseUser | None = None):
    """Extend a live lock by `ttl_s` from now; a lock already expired or released is lost (409)."""
    if not 1 <= ttl_s <= LOCK_TTL_MAX_S:
        raise InvalidRequest(f"ttl_s={ttl_s} is out of range 1..{LOCK_TTL_MAX_S}.")
    lock = _lock_for_update(lock_id)
    if not _may_manage_lock(lock, agent=agent, user=user):
        raise Forbidden("Only the lock's holder, or staff, may renew it.")
    now = _db_now()
    if lock.released_at is not None or lock.expires_at <= now:
        raise Conflict(
            f"The lock on {lock.path} has {'been released' if lock.released_at else 'expired'}; acquire it again.",
        )
    lock.expires_at = now + timedelta(seconds=ttl_s)
    lock.save(update_fields=["expires_at"])
    return lock


def lock_renew_for_step(*, step: Step, expires_at: datetime) -> int:
    """A heartbeat carries the step's locks along with its lease."""
    from coordination.models import FileLock

    return FileLock.objects.filter(step=step, released_at__isnull=True, expires_at__gt=timezone.now()).update(
        expires_at=expires_at
    )


def lock_release_for_step(*, step: Step, reason: str) -> int:
    return lock_release_for_steps(step_ids=[step.id], reason=reason)


def lock_release_for_steps(*, step_ids: list[UUID], reason: str) -> int:
    """Release every live lock taken under these steps (their end, or their lease's)."""
    if not step_ids:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE coordination_filelock l
            SET released_at = LEAST(clock_timestamp(), l.expires_at), release_reason = %s
            FROM coordination_step s
            WHERE l.step_id = ANY(%s::uuid[]) AND l.released_at IS NULL AND s.id = l.step_id
            RETURNING l.project_id, s.workflow_id, l.step_id, l.agent_id, l.path, l.mode, l.fencing
            """,
            [reason[:32], step_ids],
        )
        rows = cursor.fetchall()
    if not rows:
        return 0
    notify.notify_locks({row[0] for row in rows})
    by_step: dict[tuple, list] = {}
    for project_id, workflow_id, step_id, agent_id, path, mode, fencing in rows:
        by_step.setdefault((workflow_id, step_id, agent_id), []).append({"path": path, "mode": mode, "fencing": fencing})
    for (workflow_id, step_id, agent_id), locks in by_step.items():
        event_record(kind="locks.released", workflow_id=workflow_id, step_id=step_id, agent_id=agent_id,
                     data={"reason": reason, "locks": locks})
    return len(rows)


def _record_locks_released(rows: list, *, workflow_id: UUID, step_id: UUID, reason: str) -> None:
    """Wake lock waiters and record `locks.released` for rows (project, agent, path, mode, fencing) of one step."""
    notify.notify_locks({row[0] for row in rows})
    by_agent: dict[Any, list] = {}
    for _project_id, agent_id, path, mode, fencing in rows:
        by_agent.setdefault(agent_id, []).append({"path": path, "mode": mode, "fencing": fencing})
    for agent_id, locks in by_agent.items():
        event_record(kind="locks.released", workflow_id=workflow_id, step_id=step_id, agent_id=agent_id,
                     data={"reason": reason, "locks": locks})


def locks_sweep() -> int:
    """Mark expired locks released (they stopped blocking at `expires_at` already) and record it."""
    from coordination.models import LockWaiter

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                """
                UPDATE coordination_filelock l
                SET released_at = l.expires_at, release_reason = 'expired'
                WHERE l.released_at IS NULL AND l.expires_at <= clock_timestamp()
                RETURNING l.project_id, l.step_id, l.agent_id, l.path, l.mode, l.fencing
                """
            )
            rows = cursor.fetchall()
        LockWaiter.objects.filter(expires_at__lt=timezone.now() - timedelta(minutes=1)).delete()
        if not rows:
            return 0
        workflow_of = dict(Step.objects.filter(id__in={row[1] for row in rows if row[1]}).values_list("id", "workflow_id"))
        grouped: dict[tuple, list] = {}
        for project_id, step_id, agent_id, path, mode, fencing in rows:
            key = (workflow_of.get(step_id), step_id, agent_id)
            grouped.setdefault(key, []).append({"path": path, "mode": mode, "fencing": fencing})
        for (workflow_id, step_id, agent_id), locks in grouped.items():
            event_record(kind="locks.expired", workflow_id=workflow_id, step_id=step_id, agent_id=agent_id,
                         data={"locks": locks})
        notify.notify_locks({row[0] for row in rows})
    return len(rows)


# --- planning, audits, rework, synthesis --------------------------------------


@transaction.atomic
def workflow_plan_apply(*, workflow_id: UUID, steps: tuple[StepSpec, ...], usage: dict[str, Any] | None = None) -> Workflow:
    """Give a `planning` workflow the steps the planner made (already validated) and start it."""
    workflow = _locked_workflow(workflow_id)
    if workflow.status != WorkflowStatus.PLANNING:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}, not planning.")
    problems = workflow_validate(WorkflowSpec(name=workflow.name, project=workflow.project.name, steps=steps))
    if problems:
        raise InvalidWorkflow(problems)
    ready = _create_steps(workflow=workflow, steps=steps)
    Workflow.objects.filter(id=workflow.id).update(status=WorkflowStatus.RUNNING)
    event_record(kind="workflow.planned", workflow_id=workflow.id,
                 data={"total_steps": len(steps), "ready": ready, **({"usage": usage} if usage else {})})
    workflow.refresh_from_db()
    return workflow


@transaction.atomic
def workflow_plan_failed(*, workflow_id: UUID, reason: str) -> Workflow:
    workflow = _locked_workflow(workflow_id)
    if workflow.status != WorkflowStatus.PLANNING:
        return workflow
    workflow.status = WorkflowStatus.FAILED
    workflow.failure_reason = reason
    workflow.finished_at = timezone.now()
    workflow.save(update_fields=["status", "failure_reason", "finished_at", "updated_at"])
    event_record(kind="workflow.failed", workflow_id=workflow.id, data={"status": "failed", "reason": reason})
    return workflow


@transaction.atomic
def workflow_audit_request(*, workflow_id: UUID, user: AbstractBaseUser | None = None, agent: Agent | None = None) -> Workflow:
    """Ask for an audit now (POST /v1/workflows/{id}/audits): it runs in a Celery worker."""
    workflow = _locked_workflow(workflow_id)
    if workflow.status != WorkflowStatus.COMPLETED:
        raise InvalidState(f"Workflow {workflow.name!r} is {workflow.status}; only a completed workflow is audited.")
    workflow.audit_status = AuditStatus.PENDING
    workflow.save(update_fields=["audit_status", "updated_at"])
    event_record(kind="audit.requested", workflow_id=workflow.id, agent_id=agent.id if agent else None,
                 data=_actor(user, agent))
    _enqueue_after_commit("coordination.tasks.audit_workflow", workflow.id)
    return workflow


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


_REWORK_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT id FROM coordination_step WHERE workflow_id = %s AND key = ANY(%s::text[])
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
)
SELECT id FROM down
"""


@transaction.atomic
def audit_record(*, workflow_id: UUID, findings: AuditFindings) -> AuditReport:
    """Store an audit; a failed one sends the named steps back for rework while rounds remain."""
    workflow = _locked_workflow(workflow_id)
    report = AuditReport.objects.create(
        workflow=workflow, round=workflow.rework_round, successful=findings.successful,
        feedback=findings.feedback, rework_suggestions=findings.rework_suggestions,
        confidence=max(0.0, min(1.0, findings.confidence)), steps_reviewed=findings.steps_reviewed,
        criteria=findings.criteria, checks=findings.checks, reviewer=findings.reviewer,
    )
    workflow.audit_status = AuditStatus.PASSED if findings.successful else AuditStatus.FAILED
    workflow.save(update_fields=["audit_status", "updated_at"])
    event_record(kind="audit.recorded", workflow_id=workflow.id,
                 data={"audit_id": str(report.id), "successful": findings.successful, "round": report.round,
                       "rework": [s["step"] for s in findings.rework_suggestions]})
    keys = sorted({s["step"] for s in findings.rework_suggestions
                   if Step.objects.filter(workflow=workflow, key=s["step"]).exists()})
    if (not findings.successful and keys and workflow.status == WorkflowStatus.COMPLETED
            and workflow.rework_round < workflow.max_rework_rounds):
        _workflow_rework(workflow=workflow, keys=keys, report=report, findings=findings)
    return report


def _workflow_rework(*, workflow: Workflow, keys: list[str], report: AuditReport, findings: AuditFindings) -> None:
    """The named steps and everything downstream of them run again, with the auditor's feedback as input."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_REWORK_SQL, [workflow.id, keys])
        ids = [row[0] for row in cursor.fetchall()]
    steps = {step.id: step for step in Step.objects.select_for_update().filter(id__in=ids)}
    inside = set(steps)
    open_deps: dict[UUID, int] = {step_id: 0 for step_id in steps}
    for step_id, dep_id in StepDependency.objects.filter(step_id__in=inside).values_list("step_id", "depends_on_id"):
        if dep_id in inside:
            open_deps[step_id] += 1
    reasons = {s["step"]: s["reason"] for s in findings.rework_suggestions}
    round_number = workflow.rework_round + 1
    moves: dict[str, int] = {}
    ready_roles = []
    for step in steps.values():
        _add(moves, step.status, -1)
        step.remaining_deps = open_deps[step.id]
        step.status = StepStatus.READY if step.remaining_deps == 0 else StepStatus.PENDING
        _add(moves, step.status, 1)
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
    Step.objects.bulk_update(steps.values(), ["remaining_deps", "status", "available_at", "attempts_released",
                                              "finished_at", "extra_inputs", "updated_at"])
    snapshot = _workflow_move(workflow.id, moves)
    Workflow.objects.filter(id=workflow.id).update(status=WorkflowStatus.RUNNING, finished_at=None,
                                                   rework_round=round_number)
    notify.notify_ready(ready_roles)
    event_record_many([_event(snapshot.seqs(), "workflow.rework", workflow_id=workflow.id,
                              data={"round": round_number, "steps": keys, "rerun": len(steps),
                                    "audit_id": str(report.id)})])


@transaction.atomic
def workflow_set_synthesis(*, workflow_id: UUID, synthesis: str, source: str) -> Workflow:
    workflow = _locked_workflow(workflow_id)
    workflow.synthesis = synthesis
    workflow.save(update_fields=["synthesis", "updated_at"])
    event_record(kind="workflow.synthesized", workflow_id=workflow.id,
                 data={"source": source, "length": len(synthesis)})
    return workflow


# --- people's decisions and agent administration -----------------------------

HUMAN_ROLE = "human"


@transaction.atomic
def step_decide(*, step_id: UUID, user: AbstractBaseUser, approve: bool, comment: str = "") -> dict[str, Any]:
    """A person approves or rejects an approval step (role `human`), through the same path as a report."""
    now = timezone.now()
    step = _locked_step(step_id)
    if step.role != HUMAN_ROLE:
        raise InvalidState(f"Step {step.key!r} is for role {step.role!r}; only '{HUMAN_ROLE}' steps are decided here.")
    if step.status != StepStatus.READY:
        raise InvalidState(f"Step {step.key!r} is {step.status}; it can be decided once it is ready.")
    if step.workflow.status != WorkflowStatus.RUNNING:
        raise InvalidState(f"Workflow {step.workflow.name!r} is {step.workflow.status}; resume it first.")
    attempt = Attempt.objects.create(
        step=step, agent=None, number=step.attempt + 1, lease_token_hash=token_hash(secrets.token_urlsafe(16)),
        expires_at=now,
    )
    step.attempt = attempt.number
    step.save(update_fields=["attempt", "updated_at"])
    who = user.get_username()
    text = comment.strip()
    outcome = Outcome(
        status=StepStatus.COMPLETED if approve else StepStatus.FAILED,
        final_result=(f"Approved by {who}" + (f": {text}" if text else ".")) if approve else "",
        outputs={"decision": "approved" if approve else "rejected", "by": who, "comment": text},
        error="" if approve else f"Rejected by {who}" + (f": {text}" if text else "."),
        retryable=False,
    )
    return _finish_step(step=step, attempt=attempt, outcome=outcome, now=now, from_status=StepStatus.READY,
                        actor={"by_user": who, "decision": outcome.outputs["decision"]}, agent_id=None)


@transaction.atomic
def agent_set_enabled(*, agent_id: UUID, enabled: bool, user: AbstractBaseUser | None = None) -> Agent:
    """Disable an agent (its token stops working at once: 401) or enable it again."""
    agent = Agent.objects.select_for_update().filter(id=agent_id).first()
    if agent is None:
        raise NotFound(f"Agent {agent_id} does not exist.")
    if agent.enabled != enabled:
        agent.enabled = enabled
        agent.save(update_fields=["enabled"])
        event_record(kind="agent.enabled" if enabled else "agent.disabled", agent_id=agent.id,
                     data={"name": agent.name, **_actor(user, None)})
    return agent
