"""Template contexts shared by the pages and the WebSocket pushes, so a region renders the same either way."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from urllib.parse import quote

from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound

from coordination import selectors, workspace_reads
from coordination.errors import NotFound
from coordination.services import pull
from coordination.models import Attempt, Event, FileLock, FileVersion, Project, Result, Step, Workflow

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
        lock.href = path_href(lock.project.name, lock.path)
    return rows


def path_href(project: str, path: str) -> str:
    """Where a lock's path is shown: a file's page, or the tree under a directory ("src/"; "./" is all of it)."""
    if path == "./":
        return reverse("dashboard:project", args=[project])
    if path.endswith("/"):
        return f'{reverse("dashboard:project", args=[project])}?dir={quote(path)}'
    return reverse("dashboard:project-file", args=[project, path])


def workflow(workflow: Workflow) -> dict:
    steps, depends_on = selectors.workflow_steps(workflow=workflow)
    for step in steps:
        step.deps = depends_on.get(step.id, [])
    events = list(selectors.visible_events(Event.objects.filter(workflow=workflow)).order_by("-seq")[:200])
    events.reverse()
    return {
        "workflow": workflow,
        "steps": steps,
        "dag": dag(steps, depends_on),
        "locks": locks(workflow=workflow),
        "events": events,
        "last_seq": events[-1].seq if events else 0,
        "audits": list(selectors.workflow_audits(workflow=workflow)),
        "files": workflow_files(workflow),
    }


WORKFLOW_FILES_MAX = 300


def workflow_files(workflow: Workflow) -> list[FileVersion]:
    """The changes the workflow's steps made to the workspace, newest first (one statement)."""
    return list(FileVersion.objects.filter(step__workflow=workflow).select_related("project", "step", "agent")
                .only("path", "version", "deleted", "size", "changed_at", "project__name", "step__key", "agent__name")
                .order_by("-version", "path")[:WORKFLOW_FILES_MAX])


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
        "changes": step_changes(step),
        "last_seq": selectors.workflow_last_seq(step.workflow_id),
        "online_window": timedelta(seconds=settings.AM_AGENT_ONLINE_WINDOW_S),
    }


def step_changes(step: Step) -> list[dict]:
    changes = workspace_reads.step_changes(step=step)
    for change in changes:
        change["diff_lines"] = diff_lines(change["diff"])
        change["href"] = f'{reverse("dashboard:project-file", args=[change["project"], change["path"]])}?version={change["version"]}'
    return changes


def diff_lines(diff: str | None) -> list[dict]:
    """A unified diff as lines tagged for colour; the template escapes their text."""
    if not diff:
        return []
    lines = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = ""
        lines.append({"kind": kind, "text": line})
    return lines


def projects() -> list[Project]:
    return list(Project.objects.order_by("name"))


TREE_MAX_ROWS = 5000


def project_tree(project: Project, *, version: int | None = None, directory: str = "") -> dict:
    """The tree (under `directory`) at `version` or now, as indented rows: each directory once, before its files."""
    at, files = workspace_reads.workspace_tree(project=project, prefix=directory, version=version)
    rows: list[dict] = []
    seen: set[str] = set()
    for entry in sorted(files, key=lambda f: f["path"].split("/"))[:TREE_MAX_ROWS]:
        parts = entry["path"][len(directory):].split("/")
        for depth in range(len(parts) - 1):
            folder = directory + "/".join(parts[:depth + 1]) + "/"
            if folder not in seen:
                seen.add(folder)
                rows.append({"dir": True, "path": folder, "name": parts[depth] + "/", "depth": depth})
        rows.append({"dir": False, "path": entry["path"], "name": parts[-1], "depth": len(parts) - 1, "entry": entry})
    return {"project": project, "version": at, "pinned": version is not None, "latest": project.workspace_version,
            "directory": directory, "rows": rows, "file_count": len(files), "truncated": len(files) > TREE_MAX_ROWS}


HIGHLIGHT_MAX_BYTES = 512 * 1024
# Pygments escapes every token it writes: its HTML is the only markup built from a file's content.
SOURCE_FORMATTER = HtmlFormatter(linenos="table", cssclass="source", lineanchors="L", anchorlinenos=True,
                                 wrapcode=True)


def highlighted(path: str, text: str) -> SafeString:
    try:
        lexer = get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False, ensurenl=False)
    return mark_safe(highlight(text, lexer, SOURCE_FORMATTER))  # noqa: S308 - Pygments escapes the content


def project_file(project: Project, path: str, *, version: int | None = None) -> dict:
    """One file at `version` or now: highlighted text, or (binary, too large) a download only; None when absent."""
    ctx: dict = {"project": project, "path": path, "pinned": version is not None, "file": None}
    try:
        read = workspace_reads.workspace_file(project=project, path=path, version=version)
    except NotFound:
        return ctx
    text = workspace_reads.text_of(read.content)
    too_large = len(read.content) > HIGHLIGHT_MAX_BYTES
    return {**ctx, "file": read.entry, "binary": text is None, "too_large": too_large,
            "source": highlighted(path, text) if text is not None and not too_large else None}


def file_history(project: Project, path: str) -> dict:
    try:
        history = workspace_reads.workspace_history(project=project, path=path, limit=200)
    except NotFound:
        history = []
    return {"project": project, "path": path, "history": history}


def file_diff(project: Project, path: str, *, before: int, after: int) -> dict:
    """The diff of `path` between two workspace versions (either may predate the file or follow its deletion)."""
    contents = []
    for version in (before, after):
        try:
            contents.append(workspace_reads.workspace_file(project=project, path=path, version=version).content)
        except NotFound:
            contents.append(None)
    diff = workspace_reads.unified_diff(path, *contents)
    return {"before": before, "after": after, "diff": diff, "diff_lines": diff_lines(diff),
            "same": contents[0] == contents[1]}
