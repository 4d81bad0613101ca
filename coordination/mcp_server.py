"""MCP: any MCP-capable agent works for AM with no client code; its tools are the worker API.

Served over Streamable HTTP at `/mcp` by the official `mcp` SDK (see
`am_project/asgi.py`), authenticated with the same agent bearer tokens as
`/v1`. Every tool is a thin call into the same services and serializers as the
REST views, with the same checks; a refusal reaches the agent as a tool error
that says what went wrong and what to do next.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import json
import time
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from rest_framework import serializers as drf_serializers
from rest_framework.renderers import JSONRenderer

from coordination import db_errors, workspace_reads
from coordination.errors import InvalidRequest, NotFound, ServiceError
from coordination.models import Agent, Workflow
from coordination.paths import MAX_PATH_LENGTH, normalise_file_path
from coordination.services import agent_registry, file_locks, leases, pull, reports, tokens, workspace

# What to do next, by error code: appended to the service's own message.
NEXT_STEP = {
    "stale_lease": "Drop this step's work and call pull_step for another.",
    "lock_conflict": "Pick another step (release this one's locks first), or call acquire_locks again with wait_s.",
    "at_capacity": "Report or finish a step you hold before pulling another.",
    "not_found": "Check the id, project or path: use what pull_step, acquire_locks or list_files returned.",
    "forbidden": "Use only steps, locks and roles that are yours.",
    "invalid_request": "Fix the arguments and call again.",
    "busy": "Call again in a few seconds.",
    "database_unavailable": "Call again in a few seconds.",
    "invalid_path": "Give a file's path relative to the workspace, like src/app.py: no leading '/', no '..'.",
    "lock_required": "Call acquire_locks for the path with mode 'write' (with your step_id and lease_token), "
                     "then write with its fencing.",
    "stale_fencing": "Your lock ended or was taken over: read the file again, lock it again, then write.",
    "precondition_failed": "Read the file again and redo your change on its current content.",
    "too_large": "Keep each file within the limit: split the content into several smaller files.",
}


def _plain(data: Any) -> Any:
    """DRF output (UUIDs, datetimes, decimals) as plain JSON values."""
    return json.loads(JSONRenderer().render(data))


def _refuse(error: ServiceError) -> ToolError:
    extra = {k: v for k, v in error.extra.items() if k != "errors"}
    hint = NEXT_STEP.get(error.code, "")
    details = f" {json.dumps(_plain(extra))}" if extra else ""
    return ToolError(f"{error.code}: {error.detail}{details} {hint}".strip())


def _invalid(errors: dict) -> ToolError:
    return ToolError(f"invalid_request: {json.dumps(_plain(errors))} {NEXT_STEP['invalid_request']}")


def _agent() -> Agent:
    token = get_access_token()
    agent = Agent.objects.filter(id=token.client_id if token else None, enabled=True).first()
    if agent is None:
        raise ToolError("unauthorized: this agent's token no longer works; ask an administrator.")
    return agent


async def _call(function, *args, **kwargs):
    """Run a sync service call in a thread with a database connection; service errors become tool errors."""
    try:
        return await database_sync_to_async(function)(*args, **kwargs)
    except ServiceError as error:
        raise _refuse(error) from None
    except drf_serializers.ValidationError as error:
        raise _invalid(error.detail) from None
    except (OperationalError, InterfaceError) as error:
        raise _refuse(await database_sync_to_async(db_errors.explain)(error)) from None


# The agent `MCPApp` found for this request's token (the token, the agent or None), so the SDK's check
# does not look it up a second time.
_checked_token: contextvars.ContextVar[tuple[str, Agent | None] | None] = contextvars.ContextVar(
    "am_mcp_checked_token", default=None)


class AgentTokenVerifier:
    """The agent bearer tokens of `/v1`; a disabled agent's token is refused."""

    async def verify_token(self, token: str) -> AccessToken | None:
        checked = _checked_token.get()
        if checked is not None and checked[0] == token:
            agent = checked[1]
        else:
            agent = await database_sync_to_async(_agent_for_token)(token)
        if agent is None:
            return None
        return AccessToken(token=token, client_id=str(agent.id), scopes=["agent"], subject=agent.name)


def _agent_for_token(token: str) -> Agent | None:
    from coordination.api.auth import agent_by_token_hash

    agent = agent_by_token_hash(tokens.token_hash(token))
    if agent is None or not agent.enabled:
        return None
    agent_registry.agent_seen(agent=agent)
    return agent


_public_url = getattr(settings, "AM_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

mcp = MCPServer(
    "AgentManager",
    instructions=(
        "You are a worker for AgentManager (AM), which coordinates many agents on one workflow and one shared "
        "workspace. Pull a step for your role, keep its lease alive with heartbeat while you work, read files "
        "with read_file before you change them, lock them and write them through AM with write_file and the "
        "lock's fencing number, and report the result. See the prompt 'work_a_step'."
    ),
    token_verifier=AgentTokenVerifier(),
    # Agent tokens are ours, not OAuth tokens bound to an audience: the verifier checks them itself.
    auth=AuthSettings(issuer_url=_public_url, resource_server_url=f"{_public_url}/mcp", validate_token_resource=False),
)


# --- tools ----------------------------------------------------------------------


def _pull(role: str, wait_s: float) -> dict | None:
    from coordination.api import serializers as s

    agent = _agent()
    lease = pull.pull_waiting(agent=agent, roles=pull.parse_pull_roles(role), wait=pull.parse_wait(wait_s))
    return _plain(s.PullOutSerializer(s.pull_payload(lease)).data) if lease else None


@mcp.tool()
async def pull_step(role: str, wait_s: float = 0) -> dict:
    """Take the next ready step of your role (or several roles, comma-separated) and hold it under a lease.

    Call this when you are free to work. Returns the step (its description, the files it declares and the
    results of the steps it depends on as `inputs`), its workflow (`workflow.project` is the project whose
    workspace you work in: pass it to read_file, write_file and the other file tools), and a lease: keep
    `lease.token`, call heartbeat before `lease.expires_at` (every ttl_s/3 seconds is safe), and finish with
    report_result. `lease.locks` are the locks granted with the lease on the step's declared files (`path`,
    `mode`, `fencing`): write a file declared for writing with its lock's `fencing`, no acquire_locks needed.
    `wait_s` (0 to 30) waits that long for a step to become ready. If nothing is ready, `step` is null:
    call again later. at_capacity means you already hold as many steps as you may: finish one first.
    """
    pulled = await _call(_pull, role, wait_s)
    return pulled or {"step": None, "detail": f"No step of role(s) {role!r} is ready; call pull_step again later."}


def _heartbeat(step_id: str, lease_token: str, iterations: list) -> dict:
    from coordination.api import serializers as s

    body = s.HeartbeatInSerializer(data={"lease_token": lease_token, "iterations": iterations})
    body.is_valid(raise_exception=True)
    result = leases.step_heartbeat(step_id=UUID(step_id), agent=_agent(),
                                     lease_token=body.validated_data["lease_token"],
                                     iterations=s.to_iterations(body.validated_data["iterations"]))
    return _plain(s.HeartbeatOutSerializer(result).data)


@mcp.tool()
async def heartbeat(step_id: str, lease_token: str, iterations: list[dict] | None = None) -> dict:
    """Keep your lease on a step alive, and record your reasoning so far.

    Call it regularly while you work (before the lease expires). `iterations` are your new
    reasoning steps, each {"iteration": n, "thought": ..., "action": ..., "observation": ...}; sending one
    again is harmless. The answer has the new `expires_at`; if `cancel` is true, the workflow was paused
    or cancelled: stop working on this step and do not report it. stale_lease means the step is no
    longer yours: drop the work.
    """
    return await _call(_heartbeat, _uuid(step_id), lease_token, iterations or [])


def _report(payload: dict) -> dict:
    from coordination.api import serializers as s

    body = s.ReportInSerializer(data=payload)
    body.is_valid(raise_exception=True)
    result = reports.step_report(step_id=body.validated_data["step_id"], agent=_agent(),
                                  lease_token=body.validated_data["lease_token"], outcome=body.to_outcome())
    return _plain(s.ReportOutSerializer(result).data)


@mcp.tool()
async def report_result(step_id: str, lease_token: str, status: str, final_result: str = "",
                        outputs: dict | None = None, error: str = "", retryable: bool = False,
                        iterations: list[dict] | None = None, usage: dict | None = None) -> dict:
    """Finish a step you hold: status "completed" with `final_result` (and any structured `outputs`),
    or "failed" with `error` (`retryable` true if another attempt may succeed).

    Include your whole reasoning history as `iterations` ({"iteration", "thought", "action",
    "observation"}) and, if you know it, `usage` ({"model", "prompt_tokens", "completion_tokens",
    "cost_usd"}). The answer lists the steps your result released. Reporting the same result again
    returns the same answer. stale_lease means your lease ended and the result was not applied: drop it.
    """
    payload: dict[str, Any] = {"step_id": step_id, "lease_token": lease_token, "status": status,
                               "final_result": final_result, "outputs": outputs or {}, "error": error,
                               "retryable": retryable, "iterations": iterations or []}
    if usage:
        payload["usage"] = usage
    return await _call(_report, payload)


def _acquire(payload: dict) -> dict:
    from coordination.api import serializers as s

    body = s.LockInSerializer(data=payload)
    body.is_valid(raise_exception=True)
    data = body.validated_data
    locks = file_locks.locks_acquire(
        agent=_agent(), paths=data["paths"], mode=data["mode"], project_name=data.get("project"),
        step_id=data.get("step_id"), lease_token=data.get("lease_token"), ttl_s=data.get("ttl_s"),
        wait_s=data["wait_s"], release_connection=pull.release_idle_connection)
    from coordination import selectors

    return _plain(s.LockListSerializer({"locks": selectors.locks_by_id([lock.id for lock in locks])}).data)


@mcp.tool()
async def acquire_locks(paths: list[str], mode: str = "write", ttl_s: int | None = None, step_id: str | None = None,
                        lease_token: str | None = None, project: str | None = None, wait_s: float = 0) -> dict:
    """Lock workspace files before you change them (mode "write") or to read them unchanged ("read").

    Paths are relative to the workspace ("src/app.py"); one ending in "/" covers a whole directory. Pass
    your step_id and lease_token to hold the locks under your step's lease (they end with it); else they
    last `ttl_s` seconds (default 300). All paths are granted or none. lock_conflict names who holds what
    and until when: pick another step, or call again with wait_s (up to 30) to queue for them. Keep the
    returned ids and `fencing` numbers (write_file and delete_file take the fencing); release the locks with
    release_locks when done.
    """
    payload: dict[str, Any] = {"paths": paths, "mode": mode, "wait_s": wait_s}
    for name, value in (("ttl_s", ttl_s), ("step_id", step_id), ("lease_token", lease_token), ("project", project)):
        if value is not None:
            payload[name] = value
    return await _call(_acquire, payload)


def _release(ids: list[str]) -> dict:
    agent = _agent()
    released = [str(file_locks.lock_release(lock_id=UUID(lock_id), agent=agent).id) for lock_id in ids]
    return {"released": released}


@mcp.tool()
async def release_locks(ids: list[str]) -> dict:
    """Release locks you hold, by the ids acquire_locks returned, as soon as you are done with the files.

    Releasing a lock that already ended changes nothing. Locks taken under a step are also released when
    you report it.
    """
    return await _call(_release, [_uuid(lock_id) for lock_id in ids])


def _status(workflow_id: str) -> dict:
    from coordination.api import serializers as s

    workflow = Workflow.objects.filter(id=UUID(workflow_id)).first()
    if workflow is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return _plain(s.WorkflowStatusSerializer(workflow).data)


@mcp.tool()
async def workflow_status(workflow_id: str) -> dict:
    """A workflow's progress: its status, step counts by status, spend and budget.

    Useful to see whether the work you depend on is done, or whether the workflow was paused or cancelled.
    """
    return await _call(_status, _uuid(workflow_id))


def _ready(role: str) -> dict:
    steps = pull.steps_pullable(agent=_agent(), roles=pull.parse_pull_roles(role))
    return {"role": role, "steps": [
        {"id": str(step.id), "key": step.key, "name": step.name, "workflow": step.workflow.name,
         "workflow_id": str(step.workflow_id), "files": step.files} for step in steps]}


@mcp.tool()
async def list_ready(role: str) -> dict:
    """Steps of your role (or several roles, comma-separated) that pull_step could hand you now: the first 50,
    in the order pull_step hands them out (steps waiting out a retry backoff are not listed).

    Only a look: pull_step is what takes one, and may pass over a step whose files another agent has locked.
    """
    return await _call(_ready, role)


def _list_files(project: str, prefix: str, version: int | None) -> dict:
    from coordination.api.workspace_views import TreeSerializer

    _agent()
    if len(prefix) > MAX_PATH_LENGTH:
        raise InvalidRequest(f"prefix may be at most {MAX_PATH_LENGTH} characters.")
    found = workspace_reads.project_get(name=project)
    at, files = workspace_reads.workspace_tree(project=found, prefix=prefix, version=version)
    return _plain(TreeSerializer({"project": found.name, "version": at, "files": files}).data)


@mcp.tool()
async def list_files(project: str, prefix: str = "", version: int | None = None) -> dict:
    """The files of a project's workspace (a step's project is the pull answer's `workflow.project`).

    Each file has its path, size, `sha256`, the workspace `version` that last changed it and who changed it.
    `prefix` keeps only paths starting with it ("src/"); `version` shows the tree as it was at that
    workspace version instead of now.
    """
    return await _call(_list_files, project, prefix, version)


def _read_file(project: str, path: str, version: int | None) -> dict:
    _agent()
    found = workspace_reads.project_get(name=project)
    read = workspace_reads.workspace_file(project=found, path=normalise_file_path(path), version=version)
    entry = read.entry
    text = workspace_reads.text_of(read.content)
    answer: dict[str, Any] = {"project": found.name, "path": entry["path"], "version": entry["version"],
                              "sha256": entry["sha256"], "size": entry["size"], "binary": text is None}
    if text is None:
        answer["content_b64"] = base64.b64encode(read.content).decode("ascii")
    else:
        answer["content"] = text
    return answer


@mcp.tool()
async def read_file(project: str, path: str, version: int | None = None) -> dict:
    """A file of the workspace: read it before you change it, and never change a file you have not read.

    Text (UTF-8 without NUL bytes) comes as `content`; anything else as `content_b64` (base64) with
    `binary: true`. Keep the `sha256`: pass it to write_file as `if_match` so that your write lands only
    if nobody changed the file since you read it. `version` is the workspace version that last changed
    the file; pass `version` to read the file as it was at that workspace version. not_found: no such file.
    """
    return await _call(_read_file, project, path, version)


def _content(content: str | None, content_b64: str | None) -> bytes:
    if (content is None) == (content_b64 is None):
        raise InvalidRequest("Give exactly one of `content` (text) or `content_b64` (any bytes, base64).")
    if content is not None:
        return content.encode("utf-8")
    try:
        return base64.b64decode(content_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("content_b64 is not valid base64.") from None


def _fencing(fencing: int | None) -> int | None:
    if fencing is not None and fencing < 1:
        raise InvalidRequest("fencing is a lock's fencing number, 1 or more.")
    return fencing


def _sha256(if_match: str | None) -> str | None:
    return None if if_match is None else if_match.strip().strip('"')


def _write_file(project: str, path: str, *, fencing: int | None, if_match: str | None, if_none_match: bool = False,
                content: str | None = None, content_b64: str | None = None, delete: bool = False) -> dict:
    """One change, checked in the order of `PUT`/`DELETE /v1/projects/{project}/files/{path}`."""
    from coordination.api.workspace_views import WrittenSerializer

    agent = _agent()
    path = normalise_file_path(path)
    change = workspace.Change(path=path, content=None if delete else _content(content, content_b64),
                              fencing=_fencing(fencing))
    _, written = workspace.workspace_write(project_name=project, changes=[change], agent=agent,
                                           if_match=_sha256(if_match), if_none_match=if_none_match)
    return _plain(WrittenSerializer(written[0].as_dict()).data)


@mcp.tool()
async def write_file(project: str, path: str, fencing: int | None = None, content: str | None = None,
                     content_b64: str | None = None, if_match: str | None = None,
                     if_none_match: bool = False) -> dict:
    """Write a file of the workspace, under a write lock of yours that covers it: send the lock's `fencing`.

    For a file your step declares, the lock is in the pull answer's `lease.locks`; for any other file, call
    acquire_locks([path], "write", step_id=..., lease_token=...) first. Send text as `content`, or any bytes
    as `content_b64` (base64). `if_match`: the sha256 read_file gave you, so the write lands only if the
    file is still what you read; `if_none_match: true` only if the file does not exist yet. The answer is
    the file's new sha256, size and workspace version. Nothing is written on an error: lock_required (no
    such lock: lock first), stale_fencing (your lock ended or was taken over: read again, lock again),
    precondition_failed (the file changed: read it again), too_large, invalid_path.
    """
    return await _call(_write_file, project, path, fencing=fencing, if_match=if_match, if_none_match=if_none_match,
                       content=content, content_b64=content_b64)


@mcp.tool()
async def delete_file(project: str, path: str, fencing: int | None = None, if_match: str | None = None) -> dict:
    """Delete a file of the workspace, under a write lock of yours that covers it (its `fencing`), as write_file.

    `if_match`: the sha256 you read, so that only that content is deleted. Its history stays (file_history).
    """
    return await _call(_write_file, project, path, fencing=fencing, if_match=if_match, delete=True)


def _file_history(project: str, path: str, limit: int) -> dict:
    from coordination.api.workspace_views import HistorySerializer

    _agent()
    if not 1 <= limit <= 1000:
        raise InvalidRequest(f"limit={limit} is out of range 1..1000.")
    found = workspace_reads.project_get(name=project)
    path = normalise_file_path(path)
    history = workspace_reads.workspace_history(project=found, path=path, limit=limit)
    return _plain(HistorySerializer({"project": found.name, "path": path, "versions": history}).data)


@mcp.tool()
async def file_history(project: str, path: str, limit: int = 1000) -> dict:
    """Every version of a file, newest first: the workspace version, sha256, size, whether it was a deletion,
    when, by whom, under which step and fencing number. read_file with `version` reads an old one."""
    return await _call(_file_history, project, path, limit)


def _uuid(value: str) -> str:
    try:
        return str(UUID(str(value)))
    except ValueError:
        raise ToolError(f"invalid_request: {value!r} is not an id. {NEXT_STEP['not_found']}") from None


# --- resources and prompts ---------------------------------------------------------


def _workflow_document(workflow_id: str) -> str:
    from coordination import selectors
    from coordination.api import serializers as s

    workflow = Workflow.objects.filter(id=UUID(workflow_id)).first()
    if workflow is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    steps, deps = selectors.workflow_steps(workflow=workflow)
    return json.dumps({
        **_plain(s.WorkflowStatusSerializer(workflow).data),
        "steps": [{"id": str(step.id), "key": step.key, "name": step.name, "role": step.role,
                   "status": step.status, "depends_on": deps.get(step.id, []), "attempt": step.attempt}
                  for step in steps],
    })


@mcp.resource("am://workflows/{workflow_id}", name="workflow", mime_type="application/json")
async def workflow_resource(workflow_id: str) -> str:
    """A workflow's status and its steps (key, role, status, dependencies)."""
    await _call(_agent)
    return await _call(_workflow_document, _uuid(workflow_id))


@mcp.prompt()
def work_a_step(role: str) -> str:
    """How to work one step for AgentManager, start to finish."""
    return (
        f"You work steps of role {role!r} for AgentManager.\n"
        f"1. Call pull_step(role={role!r}, wait_s=20). If `step` is null, nothing is ready: call it again.\n"
        "2. Read the step's description, its declared `files` and `inputs` (the results of the steps it "
        "depends on). Keep `lease.token`. `workflow.project` is the project whose workspace you work in; "
        "`lease.locks` are your locks on the declared files, each with its `fencing` number.\n"
        "3. While you work, call heartbeat(step_id, lease_token, iterations) every lease.ttl_s/3 seconds, "
        "sending your new reasoning steps. If it answers cancel: true, stop and do not report.\n"
        "4. The files live in AM, not on your disk: list_files(project) shows them. Before editing a file, "
        "read it with read_file(project, path) and keep its sha256; never edit a file you have not read.\n"
        "5. Lock before writing: a file declared for writing is already locked (its lock is in lease.locks); "
        "for any other file call acquire_locks([path], 'write', step_id=..., lease_token=...) first. On "
        "lock_conflict, wait (wait_s) or work on something else; never write a file you have not locked.\n"
        "6. Write through AM: write_file(project, path, content=..., fencing=<the lock's fencing>, "
        "if_match=<the sha256 you read>) (content_b64 for binary; if_none_match=true for a new file), "
        "delete_file(project, path, fencing=...) likewise. On stale_fencing your lock ended or was taken "
        "over: read the file again, lock it again, redo the change. On precondition_failed someone changed "
        "the file: read it again and redo your change on its current content.\n"
        "7. Finish with report_result(step_id, lease_token, 'completed', final_result=..., iterations=[...]) "
        "or 'failed' with an error. Locks under the step are released with it.\n"
        "8. On stale_lease at any point, the step is no longer yours: drop the work and pull another.\n"
    )


# --- the ASGI app -------------------------------------------------------------------


def _transport_security() -> TransportSecuritySettings:
    hosts = list(settings.ALLOWED_HOSTS)
    if "*" in hosts:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    allowed = [f"{host.lstrip('.')}:*" for host in hosts] + [host.lstrip(".") for host in hosts]
    origins = [f"{scheme}://{host.lstrip('.')}:*" for host in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(allowed_hosts=allowed, allowed_origins=origins)


class MCPApp:
    """The SDK's Streamable HTTP app, with its session manager started in the server's event loop on first use
    (daphne sends no ASGI lifespan events)."""

    def __init__(self) -> None:
        self.app = mcp.streamable_http_app(streamable_http_path="/mcp", transport_security=_transport_security())
        self._started: asyncio.Event | None = None

    async def __call__(self, scope, receive, send) -> None:
        """The same guarantees as the REST API: `Server-Timing`, the body limit (`413 too_large`), and a `503`
        that says whether the server is busy or PostgreSQL unreachable when the token cannot be checked."""
        if self._started is None:
            self._started = asyncio.Event()
            asyncio.get_running_loop().create_task(self._run())
        await self._started.wait()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                took = f"app;dur={(time.perf_counter() - started) * 1000:.1f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", took)]}
            await send(message)

        body = await _read_body(receive, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
        if body is None:
            await _json_response(timed_send, 413, {
                "error": "too_large",
                "detail": "The request body is larger than the server accepts (AM_MAX_BODY_BYTES)."})
            return
        token = _bearer(scope)
        if token:
            try:
                _checked_token.set((token, await database_sync_to_async(_agent_for_token)(token)))
            except (OperationalError, InterfaceError) as error:
                answer = await database_sync_to_async(db_errors.explain)(error)
                await _json_response(timed_send, answer.status, answer.as_dict(), retry_after=True)
                return
        await self.app(scope, _replay(body, receive), timed_send)

    async def _run(self) -> None:
        async with mcp.session_manager.run():
            self._started.set()
            await asyncio.Event().wait()


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit` (MCP messages are small JSON)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that gives the body read already, then waits on the client as usual (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _bearer(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _json_response(send, status: int, payload: dict, *, retry_after: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if retry_after:
        headers.append((b"retry-after", b"2"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})

