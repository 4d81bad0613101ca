"""What a page receives for an event: rendered partials as htmx out-of-band swaps (the same partials as the page)."""

from __future__ import annotations

from uuid import UUID

from django.template.loader import render_to_string

from coordination import selectors
from coordination.models import Event, Iteration, Project, Step, Workflow
from dashboard import context

STEP_EVENTS_REDRAWING_ALL = ("steps.released", "steps.skipped", "workflow.cancelled", "workflow.rework",
                             "workflow.planned", "step.retried")
LARGE_WORKFLOW = 300


def _render(template: str, ctx: dict, viewer: dict | None = None) -> str:
    """Render a partial for one viewer: `viewer` holds its user and CSRF token, for the forms in it."""
    return render_to_string(f"dashboard/partials/{template}", {**(viewer or {}), **ctx})


def _seq_marker(seq: int | None) -> str:
    """Where the page's catch-up after a reconnection goes on from: the last event of the final part of the log
    (`selectors.visible_events`), not the event just pushed: an event numbered below it may still commit. Events
    the page already has come again then; the page drops them by id (static/js/am.js)."""
    return f'<span id="live-seq" data-seq="{seq or 0}" hidden></span>'


def _event_row(event: Event, *, target: str, where: str, viewer: dict, show_workflow: bool = False) -> str:
    item = _render("_event.html", {"event": event, "show_workflow": show_workflow}, viewer)
    return f'<ol hx-swap-oob="{where}:#{target}">{item}</ol>'


def overview(event_id: int, viewer: dict) -> str:
    event = Event.objects.select_related("workflow__project").filter(id=event_id).first()
    if event is None:
        return ""
    parts = [_event_row(event, target="recent-events", where="afterbegin", viewer=viewer, show_workflow=True)]
    if event.workflow_id:
        wf = Workflow.objects.select_related("project").get(id=event.workflow_id)
        row = _render("_workflow_row.html", {"wf": wf}, viewer)
        if event.kind == "workflow.created":
            parts.append(f'<tbody hx-swap-oob="afterbegin:#workflow-rows">{row}</tbody>')
        else:
            parts.append(row.replace("<tr ", '<tr hx-swap-oob="true" ', 1))
    if event.kind.startswith(("step.", "agent.", "locks.")):
        parts.append(_render("_agents.html", {"agents": context.agents()}, viewer))
    return "".join(parts)


def overview_refresh(viewer: dict) -> str:
    ctx = context.overview()
    rows = "".join(_render("_workflow_row.html", {"wf": wf}, viewer) for wf in ctx["workflows"])
    events = "".join(_render("_event.html", {"event": e, "show_workflow": True}, viewer) for e in ctx["events"])
    return (f'<tbody id="workflow-rows" hx-swap-oob="true">{rows}</tbody>'
            f'<ol id="recent-events" class="events" hx-swap-oob="true">{events}</ol>'
            + _render("_agents.html", {"agents": ctx["agents"]}, viewer))


def workflow(workflow_id: UUID, event_id: int, viewer: dict) -> str:
    event = Event.objects.filter(id=event_id, workflow_id=workflow_id).first()
    wf = Workflow.objects.select_related("project").filter(id=workflow_id).first()
    if event is None or wf is None:
        return ""
    parts = [_render("_workflow_header.html", {"workflow": wf}, viewer)]
    if event.step_id or event.kind in STEP_EVENTS_REDRAWING_ALL:
        steps, depends_on = selectors.workflow_steps(workflow=wf)
        for step in steps:
            step.deps = depends_on.get(step.id, [])
        if len(steps) <= LARGE_WORKFLOW:
            parts.append(_render("_dag.html", {"dag": context.dag(steps, depends_on), "steps": steps, "workflow": wf}, viewer))
            parts.append(_render("_steps.html", {"steps": steps}, viewer))
        else:
            keys = set(event.data.get("steps") or []) | ({event.data["step"]} if event.data.get("step") else set())
            parts += [_render("_step_row.html", {"step": s}, viewer).replace("<tr ", '<tr hx-swap-oob="true" ', 1)
                      for s in steps if s.key in keys]
    if event.kind.startswith("locks.") or event.kind in ("step.leased", "step.completed", "step.failed"):
        parts.append(_render("_locks.html", {"locks": context.locks(workflow=wf)}, viewer))
    if event.kind.startswith(("audit.", "workflow.")):
        parts.append(_render("_audits.html", {"workflow": wf, "audits": list(selectors.workflow_audits(workflow=wf))}, viewer))
    if event.kind == "files.changed":
        parts.append(_render("_workflow_files.html", {"files": context.workflow_files(wf), "oob": True}, viewer))
    parts.append(_event_row(event, target="timeline", where="beforeend", viewer=viewer))
    parts.append(_seq_marker(selectors.workflow_last_seq(workflow_id)))
    return "".join(parts)


def workflow_refresh(workflow_id: UUID, after: int, viewer: dict) -> str:
    wf = Workflow.objects.select_related("project").filter(id=workflow_id).first()
    if wf is None:
        return ""
    ctx = context.workflow(wf)
    missed = list(selectors.visible_events(Event.objects.filter(workflow=wf, seq__gt=after)).order_by("seq")[:500])
    timeline = "".join(_render("_event.html", {"event": e}, viewer) for e in missed)
    return (_render("_workflow_header.html", ctx, viewer) + _render("_dag.html", ctx, viewer) + _render("_steps.html", ctx, viewer)
            + _render("_locks.html", ctx, viewer) + _render("_audits.html", ctx, viewer)
            + _render("_workflow_files.html", {**ctx, "oob": True}, viewer)
            + (f'<ol hx-swap-oob="beforeend:#timeline">{timeline}</ol>' if timeline else "")
            + _seq_marker(missed[-1].seq if missed else after))


def step(step_id: UUID, event_id: int, viewer: dict) -> str:
    event = Event.objects.filter(id=event_id).first()
    if event is None or event.step_id != step_id:
        return _seq_marker(selectors.workflow_last_seq(event.workflow_id)) if event and event.workflow_id else ""
    if event.kind == "step.progress":
        iterations = Iteration.objects.filter(attempt__step_id=step_id, attempt__number=event.data.get("attempt"),
                                              index__in=event.data.get("iterations", [])).order_by("index")
        items = "".join(_render("_iteration.html", {"iteration": it}, viewer) for it in iterations)
        return f'<ol hx-swap-oob="beforeend:#thread">{items}</ol>' + _seq_marker(
            selectors.workflow_last_seq(event.workflow_id))
    return step_refresh(step_id, viewer)


def step_refresh(step_id: UUID, viewer: dict) -> str:
    step_row = Step.objects.select_related("workflow__project", "lease_agent").filter(id=step_id).first()
    if step_row is None:
        return ""
    ctx = context.step(step_row)
    return _render("_step_body.html", ctx, viewer).replace('<div id="step-body"', '<div id="step-body" hx-swap-oob="true"', 1) \
        + _seq_marker(ctx["last_seq"])


def project(name: str, path: str | None, directory: str, event_id: int, viewer: dict) -> str:
    """A project page's regions after a change of its files: the tree, and the open file when it changed."""
    event = Event.objects.filter(id=event_id).first()
    if event is None or event.kind != "files.changed" or event.data.get("project") != name:
        return ""
    changed = path is not None and (path in event.data.get("paths", []) or bool(event.data.get("truncated")))
    return project_refresh(name, path, directory, viewer, with_file=changed)


def project_refresh(name: str, path: str | None, directory: str, viewer: dict, *, with_file: bool = True) -> str:
    found = Project.objects.filter(name=name).first()
    if found is None:
        return ""
    tree = context.project_tree(found, directory=directory)
    parts = [_render("_tree.html", {"tree": tree, "path": path, "oob": True}, viewer)]
    if path is not None and with_file:
        parts.append(_render("_file.html", {"open": context.project_file(found, path), "oob": True}, viewer))
        parts.append(_render("_history.html", {**context.file_history(found, path), "oob": True}, viewer))
    return "".join(parts)
