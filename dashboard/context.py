"""Template contexts shared by the pages and the WebSocket pushes, so a region renders the same either way."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from coordination import selectors
from coordination.services import pull
from coordination.models import Attempt, Event, FileLock, Result, Step, Workflow

DAG_MAX_STEPS = 300
NODE_W, NODE_H, GAP_X, GAP_Y = 150, 34, 46, 16


def dag(steps: list[Step], depends_on: dict) -> dict | None:
    """A layered drawing of the graph: a step's column is the length of the longest path to it."""
    if not steps or len(steps) > DAG_MAX_STEPS:
        return None
    by_key = {step.key: step for step in steps}
    level: dict[str, int] = {}
    remaining = {step.key: set(depends_on.get(step.id, [])) for step in steps}
    frontier = [key for key, deps in remaining.items() if not deps]
    dependents = defaultdict(list)
    for step in steps:
        for dep in depends_on.get(step.id, []):
            dependents[dep].append(step.key)
    for key in frontier:
        level[key] = 0
    while frontier:
        nxt = []
        for key in frontier:
            for child in dependents[key]:
                level[child] = max(level.get(child, 0), level[key] + 1)
                remaining[child].discard(key)
                if not remaining[child]:
                    nxt.append(child)
        frontier = nxt
    columns: dict[int, list[str]] = defaultdict(list)
    for step in steps:
        columns[level.get(step.key, 0)].append(step.key)
    position = {}
    for column, keys in columns.items():
        for row, key in enumerate(keys):
            position[key] = (10 + column * (NODE_W + GAP_X), 10 + row * (NODE_H + GAP_Y))
    nodes = [{"step": by_key[key], "x": x, "y": y, "cx": x + NODE_W / 2, "ty": y + NODE_H / 2 + 4}
             for key, (x, y) in position.items()]
    edges = []
    for step in steps:
        for dep in depends_on.get(step.id, []):
            (x1, y1), (x2, y2) = position[dep], position[step.key]
            edges.append({"x1": x1 + NODE_W, "y1": y1 + NODE_H / 2, "x2": x2, "y2": y2 + NODE_H / 2})
    width = 20 + (max(columns) + 1) * (NODE_W + GAP_X)
    height = 20 + max(len(keys) for keys in columns.values()) * (NODE_H + GAP_Y)
    return {"nodes": nodes, "edges": edges, "width": width, "height": height, "node_w": NODE_W, "node_h": NODE_H}


def overview(*, status: str | None = None, project: str | None = None) -> dict:
    workflows = list(selectors.workflow_list(status=status, project=project)[:100])
    return {
        "workflows": workflows,
        "agents": agents(),
        "events": recent_events(),
        "status_filter": status or "",
        "project_filter": project or "",
        "statuses": [s for s in Workflow._meta.get_field("status").choices],
        "projects": sorted({w.project.name for w in Workflow.objects.select_related("project").only("project__name")[:500]}),
    }


def recent_events(limit: int = 30) -> list[Event]:
    return list(Event.objects.select_related("workflow").order_by("-id")[:limit])


def agents() -> list:
    rows = list(selectors.agents_with_load())
    for agent in rows:
        agent.online = bool(agent.online_q)
    return rows


def locks(*, workflow: Workflow | None = None) -> list[FileLock]:
    now = timezone.now()
    rows = FileLock.objects.filter(released_at__isnull=True, expires_at__gt=now).select_related(
        "project", "agent", "step")
    if workflow is not None:
        rows = rows.filter(step__workflow=workflow)
    rows = list(rows.order_by("project__name", "path"))
    for lock in rows:
        lock.seconds_left = max(0, int((lock.expires_at - now).total_seconds()))
    return rows


def workflow(workflow: Workflow) -> dict:
    steps, depends_on = selectors.workflow_steps(workflow=workflow)
    for step in steps:
        step.deps = depends_on.get(step.id, [])
    events = list(Event.objects.filter(workflow=workflow).order_by("-seq")[:200])
    events.reverse()
    return {
        "workflow": workflow,
        "steps": steps,
        "dag": dag(steps, depends_on),
        "locks": locks(workflow=workflow),
        "events": events,
        "last_seq": workflow.event_seq,
        "audits": list(selectors.workflow_audits(workflow=workflow)),
    }


def step(step: Step) -> dict:
    attempts = list(Attempt.objects.filter(step=step).select_related("agent").prefetch_related("iterations")
                    .order_by("number"))
    results = {r.attempt_id: r for r in Result.objects.filter(step=step)}
    for attempt in attempts:
        attempt.report = results.get(attempt.id)
    current = attempts[-1] if attempts else None
    totals = {
        "prompt_tokens": sum(r.prompt_tokens for r in results.values()),
        "completion_tokens": sum(r.completion_tokens for r in results.values()),
        "cost_usd": sum((r.cost_usd for r in results.values()), start=0),
    }
    return {
        "step": step,
        "workflow": step.workflow,
        "inputs": pull.step_inputs(step),
        "depends_on": sorted(step.depends_on.values_list("key", flat=True)),
        "attempts": attempts,
        "current": current,
        "iterations": list(current.iterations.all()) if current else [],
        "totals": totals,
        "locks": list(FileLock.objects.filter(step=step).select_related("agent").order_by("-acquired_at")[:50]),
        "last_seq": step.workflow.event_seq,
        "online_window": timedelta(seconds=settings.AM_AGENT_ONLINE_WINDOW_S),
    }
