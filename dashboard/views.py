"""Dashboard pages: full pages first; htmx actions swap regions in place; live updates come over WebSockets.

Views validate and delegate: every change goes through `coordination.services`.
"""

from uuid import UUID

import yaml
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from coordination import selectors, workspace_reads
from coordination.services import file_locks, reports, workflow_control, workflow_creation
from coordination.api.serializers import WorkflowInSerializer
from coordination.errors import InvalidRequest, NotFound, ServiceError
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


@login_required
def projects_page(request: HttpRequest) -> TemplateResponse:
    return TemplateResponse(request, "dashboard/projects.html", {"projects": context.projects()})


def _version_arg(request: HttpRequest, name: str = "version") -> int | None:
    raw = request.GET.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name}={raw!r} is not a version number.") from None


def _workspace_page(request: HttpRequest, project: str, path: str | None) -> TemplateResponse:
    """The project page: the tree (at ?version=, under ?dir=) and, for a file, its content, history and a diff."""
    found = _get_or_404(workspace_reads.project_get, name=project)
    directory = request.GET.get("dir", "")
    directory = directory if directory.endswith("/") and directory != "./" else ""
    ctx: dict = {"project": found, "path": path, "directory": directory, "error": None}
    try:
        version = _version_arg(request)
        ctx["tree"] = context.project_tree(found, version=version, directory=directory)
        if path is not None:
            ctx["open"] = context.project_file(found, path, version=version)
            ctx = {**ctx, **context.file_history(found, path)}
            before, after = _version_arg(request, "from"), _version_arg(request, "to")
            if before is not None and after is not None:
                ctx["diff"] = context.file_diff(found, path, before=before, after=after)
    except InvalidRequest as exc:
        ctx["error"] = exc.detail
        ctx["tree"] = context.project_tree(found, directory=directory)
        return TemplateResponse(request, "dashboard/project.html", ctx, status=400)
    if path is not None and ctx["open"]["file"] is None and not ctx["history"]:
        raise Http404(f"No file {path} in project {found.name!r} has ever existed.")
    return TemplateResponse(request, "dashboard/project.html", ctx)


@login_required
def project_page(request: HttpRequest, project: str) -> TemplateResponse:
    return _workspace_page(request, project, None)


@login_required
def project_file_page(request: HttpRequest, project: str, path: str) -> TemplateResponse:
    return _workspace_page(request, project, path)


@login_required
@require_GET
def project_file_download(request: HttpRequest, project: str, path: str) -> HttpResponse:
    """A file's bytes as an attachment: the browser saves it, never renders it (agent-written content)."""
    found = _get_or_404(workspace_reads.project_get, name=project)
    try:
        read = workspace_reads.workspace_file(project=found, path=path, version=_version_arg(request))
    except NotFound as exc:
        raise Http404(exc.detail) from None
    except InvalidRequest as exc:
        return HttpResponse(exc.detail, status=400, content_type="text/plain; charset=utf-8")
    response = HttpResponse(read.content, content_type="application/octet-stream")
    response["Content-Disposition"] = content_disposition_header(True, path.rsplit("/", 1)[-1])
    response["X-Content-Type-Options"] = "nosniff"
    return response


@login_required
@require_GET
def project_archive(request: HttpRequest, project: str) -> HttpResponse:
    """The tree (at ?version=) as a .tar.gz, streamed file by file."""
    found = _get_or_404(workspace_reads.project_get, name=project)
    try:
        version, chunks = workspace_reads.archive_chunks(project=found, version=_version_arg(request))
    except InvalidRequest as exc:
        return HttpResponse(exc.detail, status=400, content_type="text/plain; charset=utf-8")
    response = StreamingHttpResponse(chunks, content_type="application/gzip")
    response["Content-Disposition"] = content_disposition_header(True, f"{found.name}-v{version}.tar.gz")
    return response


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
