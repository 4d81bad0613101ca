"""Dashboard pages: full pages first; htmx actions swap regions in place; live updates come over WebSockets.

Views validate and delegate: every change goes through `coordination.services`.
"""

from uuid import UUID

import yaml
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from coordination import selectors
from coordination.services import file_locks, reports, workflow_control, workflow_creation
from coordination.api.serializers import WorkflowInSerializer
from coordination.errors import NotFound, ServiceError
from coordination.models import WorkflowStatus
from dashboard import context


def _redirect(request: HttpRequest, url: str) -> HttpResponse:
    return HttpResponseClientRedirect(url) if request.htmx else HttpResponseRedirect(url)


def _get_or_404(fn, **kwargs):
    try:
        return fn(**kwargs)
    except NotFound as exc:
        raise Http404(exc.detail) from None


@login_required
def overview(request: HttpRequest) -> TemplateResponse:
    status = request.GET.get("status") or None
    if status not in (None, *WorkflowStatus.values):
        status = None
    project = request.GET.get("project") or None
    return TemplateResponse(request, "dashboard/overview.html", context.overview(status=status, project=project))


@login_required
def workflow_page(request: HttpRequest, workflow_id: UUID) -> TemplateResponse:
    workflow = _get_or_404(selectors.workflow_get, workflow_id=workflow_id)
    return TemplateResponse(request, "dashboard/workflow.html", context.workflow(workflow))


@login_required
@require_POST
def workflow_action(request: HttpRequest, workflow_id: UUID, action: str) -> HttpResponse:
    actions = {"pause": workflow_control.workflow_pause, "resume": workflow_control.workflow_resume, "cancel": workflow_control.workflow_cancel}
    if action not in actions:
        raise Http404("No such action.")
    try:
        actions[action](workflow_id=workflow_id, user=request.user)
        messages.success(request, f"Workflow {action}d." if action != "cancel" else "Workflow cancelled.")
    except ServiceError as exc:
        messages.error(request, exc.detail)
    return _redirect(request, reverse("dashboard:workflow", args=[workflow_id]))


@login_required
def step_page(request: HttpRequest, step_id: UUID) -> TemplateResponse:
    step = _get_or_404(selectors.step_get, step_id=step_id)
    return TemplateResponse(request, "dashboard/step.html", context.step(step))


@login_required
@require_POST
def step_retry(request: HttpRequest, step_id: UUID) -> HttpResponse:
    step = _get_or_404(selectors.step_get, step_id=step_id)
    try:
        workflow_control.step_retry(step_id=step_id, user=request.user)
        messages.success(request, f"Step {step.key} is back in the queue.")
    except ServiceError as exc:
        messages.error(request, exc.detail)
    return _redirect(request, reverse("dashboard:workflow", args=[step.workflow_id]))


@login_required
@require_POST
def step_decide(request: HttpRequest, step_id: UUID) -> HttpResponse:
    step = _get_or_404(selectors.step_get, step_id=step_id)
    decision = request.POST.get("decision")
    if decision not in ("approve", "reject"):
        messages.error(request, "Choose Approve or Reject.")
    else:
        try:
            reports.step_decide(step_id=step_id, user=request.user, approve=decision == "approve",
                                 comment=request.POST.get("comment", "")[:5000])
            messages.success(request, f"Step {step.key} {'approved' if decision == 'approve' else 'rejected'}.")
        except ServiceError as exc:
            messages.error(request, exc.detail)
    return _redirect(request, reverse("dashboard:workflow", args=[step.workflow_id]))


@login_required
def agents_page(request: HttpRequest) -> TemplateResponse:
    return TemplateResponse(request, "dashboard/agents.html", {"agents": context.agents()})


@login_required
def locks_page(request: HttpRequest) -> TemplateResponse:
    return TemplateResponse(request, "dashboard/locks.html", {"locks": context.locks()})


@login_required
@require_POST
def lock_release(request: HttpRequest, lock_id: UUID) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied("Only staff may force-release a lock.")
    try:
        lock = file_locks.lock_release(lock_id=lock_id, user=request.user)
        messages.success(request, f"Released the lock on {lock.path}.")
    except NotFound as exc:
        raise Http404(exc.detail) from None
    except ServiceError as exc:
        messages.error(request, exc.detail)
    return _redirect(request, request.POST.get("next") or reverse("dashboard:locks"))


SUBMIT_EXAMPLE = """name: Write a blog post
steps:
  - key: research
    name: Research the topic
    role: researcher
    files: [{path: notes/research.md, mode: write}]
  - key: draft
    name: Draft the post
    role: writer
    depends_on: [research]
  - key: approve
    name: Approve the draft
    role: human
    depends_on: [draft]
"""


@login_required
def submit_page(request: HttpRequest) -> TemplateResponse:
    form = {"graph": "", "goal": "", "name": "", "project": "default"}
    errors: dict = {}
    if request.method == "POST":
        form = {key: request.POST.get(key, "").strip() for key in form}
        data, errors = _submission(form)
        if not errors:
            serializer = WorkflowInSerializer(data=data)
            if not serializer.is_valid():
                errors["graph" if form["graph"] else "goal"] = _flatten(serializer.errors)
            else:
                try:
                    workflow = workflow_creation.workflow_create(spec=serializer.to_spec(), user=request.user)
                except ServiceError as exc:
                    errors["graph" if form["graph"] else "goal"] = [p["detail"] for p in exc.extra.get("errors", [])] or [exc.detail]
                else:
                    return _redirect(request, reverse("dashboard:workflow", args=[workflow.id]))
    return TemplateResponse(request, "dashboard/submit.html",
                            {"form": form, "errors": errors, "example": SUBMIT_EXAMPLE},
                            status=400 if errors else 200)


def _submission(form: dict) -> tuple[dict, dict]:
    if form["graph"]:
        try:
            data = yaml.safe_load(form["graph"])
        except yaml.YAMLError as exc:
            return {}, {"graph": [f"Not valid JSON or YAML: {exc}"]}
        if not isinstance(data, dict):
            return {}, {"graph": ["Give an object with `name` and `steps` (JSON or YAML)."]}
        if form["name"]:
            data.setdefault("name", form["name"])
        return data, {}
    if form["goal"]:
        if not form["name"]:
            return {}, {"name": ["Give the workflow a name."]}
        return {"name": form["name"], "goal": form["goal"], "project": form["project"] or "default"}, {}
    return {}, {"graph": ["Paste a graph, or write a goal for the planner."]}


def _flatten(errors, path: str = "") -> list[str]:
    if isinstance(errors, dict):
        out = []
        for key, value in errors.items():
            out += _flatten(value, f"{path}.{key}" if path else str(key))
        return out
    if isinstance(errors, list):
        out = []
        for index, value in enumerate(errors):
            if isinstance(value, (dict, list)):
                out += _flatten(value, f"{path}[{index}]")
            else:
                out.append(f"{path}: {value}" if path and path != "non_field_errors" else str(value))
        return out
    return [f"{path}: {errors}"]
