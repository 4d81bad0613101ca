"""Workflow specs (what a submitter or the planner sends) and their validation.

`workflow_validate` names every problem of a graph, each with its culprit; the
planner's graphs are checked by exactly the same function.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings

from coordination.errors import InvalidPath
from coordination.models import KEY_PATTERN, ROLE_PATTERN, LockMode
from coordination.paths import normalise_path

_ROLE_RE = re.compile(ROLE_PATTERN)
_KEY_RE = re.compile(KEY_PATTERN)
PROJECT_RE = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")


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


def problem(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "detail": detail, **extra}


def find_cycle(keys: list[str], deps: dict[str, list[str]]) -> list[str] | None:
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
        problems.append(problem("empty_name", "The workflow needs a name."))
    if not PROJECT_RE.match(spec.project or ""):
        problems.append(
            problem("bad_project", f"{spec.project!r} is not a valid project name: use 1 to 64 letters, digits, '_' or '-'.")
        )
    if not steps:
        problems.append(problem("empty_graph", "The workflow has no steps: give at least one step, or a goal to plan."))
        return problems
    if len(steps) > limit:
        problems.append(
            problem("too_many_steps", f"The workflow has {len(steps)} steps; the limit is {limit} (AM_MAX_STEPS_PER_WORKFLOW).")
        )
        return problems

    seen: set[str] = set()
    for index, step in enumerate(steps):
        if not _KEY_RE.match(step.key or ""):
            problems.append(
                problem(
                    "bad_key",
                    f"Step #{index + 1} has key {step.key!r}: use 1 to 100 letters, digits, '_', '.', ':' or '-'.",
                    step=step.key,
                )
            )
        elif step.key in seen:
            problems.append(problem("duplicate_key", f"Step key {step.key!r} is used more than once.", step=step.key))
        seen.add(step.key)
        if not _ROLE_RE.match(step.role or ""):
            problems.append(
                problem(
                    "bad_role",
                    f"Step {step.key!r} has role {step.role!r}: a role is a slug of a-z, 0-9, '_' and '-', "
                    "starting with a letter or digit, at most 64 characters.",
                    step=step.key,
                )
            )
        if not step.name.strip():
            problems.append(problem("empty_name", f"Step {step.key!r} needs a name.", step=step.key))
        for file in step.files:
            try:
                normalise_path(file.path)
            except InvalidPath as exc:
                problems.append(problem("bad_file", f"Step {step.key!r}: {exc.detail}", step=step.key, path=file.path))
            if file.mode not in LockMode.values:
                problems.append(
                    problem("bad_file", f"Step {step.key!r}: file mode {file.mode!r} is not 'read' or 'write'.",
                             step=step.key, path=file.path)
                )
        seen_deps: set[str] = set()
        for dep in step.depends_on:
            if dep == step.key:
                problems.append(problem("self_dependency", f"Step {step.key!r} depends on itself.", step=step.key))
            elif dep in seen_deps:
                problems.append(
                    problem("duplicate_dependency", f"Step {step.key!r} lists {dep!r} twice in depends_on.", step=step.key)
                )
            seen_deps.add(dep)
    keys = {step.key for step in steps}
    for step in steps:
        for dep in step.depends_on:
            if dep not in keys:
                problems.append(
                    problem("unknown_dependency", f"Step {step.key!r} depends on {dep!r}, which is not a step of this workflow.",
                             step=step.key, depends_on=dep)
                )
    if problems:
        return problems
    ordered = [step.key for step in steps]
    cycle = find_cycle(ordered, {step.key: list(step.depends_on) for step in steps})
    if cycle:
        problems.append(problem("cycle", f"Dependency cycle: {' -> '.join(cycle)}.", cycle=cycle))
    return problems


def normalised_files(step: StepSpec) -> list[dict[str, str]]:
    files: dict[str, str] = {}
    for file in step.files:
        path = normalise_path(file.path)
        # The same path twice: the stronger mode wins.
        if files.get(path) != LockMode.WRITE:
            files[path] = file.mode
    return [{"path": path, "mode": mode} for path, mode in files.items()]
