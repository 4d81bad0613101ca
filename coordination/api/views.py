"""The worker API, version 1 (shared/api-v1.md). Views validate and delegate to services."""

from uuid import UUID

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, PolymorphicProxySerializer, extend_schema
from rest_framework import status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from coordination import selectors
from coordination.api import serializers as s
from coordination.api.schema import FILTER_SCHEMA, PATH_SCHEMA
from coordination.api.auth import CanSubmit, IsAgent, IsAuthenticated, request_agent
from coordination.errors import Forbidden, InvalidRequest, NotFound
from coordination.models import Workflow, WorkflowStatus
from coordination.paths import normalise_path
from coordination.services import audits, file_locks, leases, pull, reports, workflow_control, workflow_creation

MAX_WAIT_S = pull.MAX_WAIT_S
MAX_IDEMPOTENCY_KEY = 200
# The largest offset, seq or workspace version a query may name (a bigint, with room to spare).
MAX_SEQ = 2**62


def _error(description: str, serializer=s.ErrorSerializer) -> OpenApiResponse:
    return OpenApiResponse(response=serializer, description=description)


AUTH_ERRORS = {
    401: _error("No token, a wrong token, or a disabled agent's token."),
    403: _error("The caller may not do this."),
}
NOT_FOUND = {404: _error("No such workflow or step.")}
BAD_REQUEST = {400: _error("Malformed JSON, wrong types or unknown fields; `errors` says where.")}
TOO_LARGE = {413: _error("The body is larger than AM_MAX_BODY_BYTES.")}


def _no_store(response: Response) -> Response:
    response["Cache-Control"] = "no-store"
    return response


def _user_and_agent(request):
    agent = request_agent(request)
    return (None if agent else request.user), agent


class APIBase(APIView):
    permission_classes = [IsAuthenticated]
    # Query parameters the view reads; any other is refused, so a typo never passes silently.
    query_params_allowed: frozenset[str] = frozenset()

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        if not hasattr(self, request.method.lower()):
            return  # a method the view does not take: 405 (dispatch), whatever the query says
        unknown = sorted(set(request.query_params) - self.query_params_allowed - {"format"})
        if unknown:
            known = ", ".join(sorted(self.query_params_allowed)) or "none"
            raise InvalidRequest(f"Unknown query parameter(s): {', '.join(map(repr, unknown))}; known: {known}.")
        for name, values in request.query_params.lists():
            if any("\x00" in value for value in values):
                # PostgreSQL cannot compare text holding NUL: refuse it here rather than fail there.
                raise InvalidRequest(f"Query parameter {name!r} contains a NUL character.")


# --- pull, heartbeat, report ---------------------------------------------------


class PullView(APIBase):
    permission_classes = [IsAgent]
    query_params_allowed = frozenset({"wait", "max"})

    @extend_schema(
        operation_id="pull_step",
        summary="Pull one ready step of your roles, leased to you",
        description=(
            "Atomically leases the oldest ready step of the highest priority among `role` (one role, or several "
            "separated by commas). `?wait=N` (at most 30) holds the request open until a step is ready or N "
            "seconds pass. A request sent again with the same `Idempotency-Key` gets the same lease back.\n\n"
            "`?max=N` (1 to 50) leases up to N steps at once, never more than the agent's free capacity, and answers "
            "`{\"leases\": [...]}` (each with its own lease token), best first. Without `max` the answer is one "
            "lease object."
        ),
        parameters=[
            OpenApiParameter("role", OpenApiTypes.STR, OpenApiParameter.PATH, description="Role, or roles separated by commas."),
            OpenApiParameter("wait", {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}, OpenApiParameter.QUERY,
                             required=False, description="Seconds to wait for a ready step, 0 to 30 (default 0)."),
            OpenApiParameter("max", {"type": "integer", "minimum": 1, "maximum": pull.MAX_BATCH},
                             OpenApiParameter.QUERY, required=False,
                             description="Lease up to this many steps in one request (a batch pull); the answer is "
                                         "then `{\"leases\": [...]}`."),
            OpenApiParameter("Idempotency-Key", {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
                             OpenApiParameter.HEADER, required=False,
                             description="A key unique to this pull (at most 200 characters); a retried request "
                                         "with it gets the same lease (the same leases, for a batch)."),
        ],
        responses={
            200: PolymorphicProxySerializer(
                component_name="PullAnswer", serializers=[s.PullOutSerializer, s.BatchPullOutSerializer],
                resource_type_field_name=None,
            ),
            204: OpenApiResponse(description="No step of these roles is ready."),
            400: _error("A role is not a valid slug, `wait` is not a number from 0 to 30, `max` is not a whole "
                        "number from 1 to 50, or the Idempotency-Key is longer than 200 characters."),
            409: _error("The Idempotency-Key was used for a lease that has ended."),
            429: _error("at_capacity: the agent holds as many steps as its capacity."),
            **AUTH_ERRORS,
        },
    )
    def get(self, request, role: str):
        agent = request_agent(request)
        roles = pull.parse_pull_roles(role)
        wait = pull.parse_wait(request.query_params.get("wait"))
        count = pull.parse_max(request.query_params.get("max"))
        key = request.headers.get("Idempotency-Key", "")
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidRequest(f"Idempotency-Key may be at most {MAX_IDEMPOTENCY_KEY} characters.")
        leases = pull.batch_pull_waiting(agent=agent, roles=roles, count=count or 1, wait=wait, idempotency_key=key)
        if not leases:
            return _no_store(Response(status=status.HTTP_204_NO_CONTENT))
        if count is None:
            return _no_store(Response(s.pull_payload(leases[0])))
        return _no_store(Response({"leases": [s.pull_payload(lease) for lease in leases]}))


class HeartbeatView(APIBase):
    permission_classes = [IsAgent]

    @extend_schema(
        operation_id="heartbeat",
        summary="Keep a lease alive; stream new reasoning iterations",
        request=s.HeartbeatInSerializer,
        responses={200: s.HeartbeatOutSerializer, 409: _error("stale_lease: the lease is no longer this token's."),
                   **BAD_REQUEST, **AUTH_ERRORS, **NOT_FOUND, **TOO_LARGE},
    )
    def post(self, request, step_id: UUID):
        body = s.HeartbeatInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = leases.step_heartbeat(
            step_id=step_id,
            agent=request_agent(request),
            lease_token=body.validated_data["lease_token"],
            iterations=s.to_iterations(body.validated_data["iterations"]),
        )
        return _no_store(Response(s.HeartbeatOutSerializer(result).data))


class ReportView(APIBase):
    permission_classes = [IsAgent]

    @extend_schema(
        operation_id="report_result",
        summary="Report a step's result with its whole Reason+Act history",
        description="Only the holder of the current lease may report. Sending the same report again returns the same answer.",
        request=s.ReportInSerializer,
        responses={200: s.ReportOutSerializer, 409: _error("stale_lease: the result was not applied."),
                   **BAD_REQUEST, **AUTH_ERRORS, **NOT_FOUND, **TOO_LARGE},
    )
    def post(self, request):
        body = s.ReportInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = reports.step_report(
            step_id=body.validated_data["step_id"],
            agent=request_agent(request),
            lease_token=body.validated_data["lease_token"],
            outcome=body.to_outcome(),
        )
        return _no_store(Response(s.report_payload(result)))


class ReleaseView(APIBase):
    permission_classes = [IsAgent]

    @extend_schema(
        operation_id="release_step",
        summary="Hand a held step back without charging an attempt",
        description="For a worker shutting down, or asked to stop by a heartbeat's `cancel`. The step's locks are released.",
        request=s.LeaseTokenInSerializer,
        responses={200: s.StepStatusOutSerializer, 409: _error("stale_lease"), **BAD_REQUEST, **AUTH_ERRORS, **NOT_FOUND},
    )
    def post(self, request, step_id: UUID):
        body = s.LeaseTokenInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = leases.step_release(
            step_id=step_id, agent=request_agent(request), lease_token=body.validated_data["lease_token"]
        )
        return _no_store(Response(s.StepStatusOutSerializer(result).data))


# --- workflows -----------------------------------------------------------------


class Pagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500


def _workflow_detail(workflow: Workflow) -> dict:
    steps, depends_on = selectors.workflow_steps(workflow=workflow)
    return s.WorkflowDetailSerializer(workflow, context={"steps": steps, "depends_on": depends_on}).data


class WorkflowListView(APIBase):
    permission_classes = [IsAuthenticated, CanSubmit]
    query_params_allowed = frozenset({"status", "project", "limit", "offset"})

    @extend_schema(
        operation_id="list_workflows",
        summary="List workflows, newest first",
        parameters=[
            OpenApiParameter("status", OpenApiTypes.STR, enum=WorkflowStatus.values, required=False),
            OpenApiParameter("project", FILTER_SCHEMA, required=False, description="A project's name."),
            OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": 500}, required=False),
            OpenApiParameter("offset", {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}, required=False),
        ],
        responses={200: s.WorkflowPageSerializer, **BAD_REQUEST, **AUTH_ERRORS},
    )
    def get(self, request):
        status_filter = request.query_params.get("status")
        if status_filter is not None and status_filter not in WorkflowStatus.values:
            raise InvalidRequest(f"status={status_filter!r} is not one of {', '.join(WorkflowStatus.values)}.")
        _int_param(request, "limit", Pagination.default_limit, 1, Pagination.max_limit)
        _int_param(request, "offset", 0, 0, MAX_SEQ)
        workflows = selectors.workflow_list(status=status_filter, project=_filter_param(request, "project"))
        paginator = Pagination()
        page = paginator.paginate_queryset(workflows, request, view=self)
        return paginator.get_paginated_response(s.WorkflowOutSerializer(page, many=True).data)

    @extend_schema(
        operation_id="create_workflow",
        summary="Submit a workflow: a graph of steps, or a goal for the planner",
        request=s.WorkflowInSerializer,
        responses={
            201: s.WorkflowDetailSerializer,
            202: OpenApiResponse(s.WorkflowDetailSerializer, description="A goal without steps: `planning`."),
            400: _error("invalid_workflow (graph problems in `errors`) or invalid_request."),
            **AUTH_ERRORS,
            **TOO_LARGE,
        },
    )
    def post(self, request):
        body = s.WorkflowInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user, agent = _user_and_agent(request)
        workflow = workflow_creation.workflow_create(spec=body.to_spec(), user=user, agent=agent)
        code = status.HTTP_202_ACCEPTED if workflow.status == WorkflowStatus.PLANNING else status.HTTP_201_CREATED
        return Response(_workflow_detail(workflow), status=code)


class WorkflowDetailView(APIBase):
    @extend_schema(operation_id="get_workflow", summary="A workflow with its steps",
                   responses={200: s.WorkflowDetailSerializer, **AUTH_ERRORS, **NOT_FOUND})
    def get(self, request, workflow_id: UUID):
        return Response(_workflow_detail(selectors.workflow_get(workflow_id=workflow_id)))


class WorkflowStatusView(APIBase):
    @extend_schema(operation_id="workflow_status", summary="A workflow's progress, from maintained counters",
                   responses={200: s.WorkflowStatusSerializer, **AUTH_ERRORS, **NOT_FOUND})
    def get(self, request, workflow_id: UUID):
        workflow = Workflow.objects.filter(id=workflow_id).first()
        if workflow is None:
            raise NotFound(f"Workflow {workflow_id} does not exist.")
        return _no_store(Response(s.WorkflowStatusSerializer(workflow).data))


class _WorkflowControl(APIBase):
    permission_classes = [IsAuthenticated, CanSubmit]
    action_name = ""

    def act(self, workflow_id, user, agent):
        raise NotImplementedError

    def post(self, request, workflow_id: UUID):
        if request.data not in ({}, None) and not isinstance(request.data, dict):
            raise InvalidRequest("Send no body, or an empty JSON object.")
        if request.data:
            raise InvalidRequest(f"{self.action_name} takes no fields; unknown: {', '.join(sorted(request.data))}.")
        user, agent = _user_and_agent(request)
        workflow = self.act(workflow_id, user, agent)
        return Response(s.WorkflowStatusSerializer(workflow).data)


_CONTROL_RESPONSES = {200: s.WorkflowStatusSerializer, 409: _error("invalid_state: not possible in the workflow's status."),
                      **AUTH_ERRORS, **NOT_FOUND}


class WorkflowCancelView(_WorkflowControl):
    action_name = "cancel"

    @extend_schema(operation_id="cancel_workflow", summary="Cancel a workflow", request=None, responses=_CONTROL_RESPONSES)
    def post(self, request, workflow_id: UUID):
        return super().post(request, workflow_id)

    def act(self, workflow_id, user, agent):
        return workflow_control.workflow_cancel(workflow_id=workflow_id, user=user, agent=agent)


class WorkflowPauseView(_WorkflowControl):
    action_name = "pause"

    @extend_schema(operation_id="pause_workflow", summary="Pause: hand out no new steps", request=None,
                   responses=_CONTROL_RESPONSES)
    def post(self, request, workflow_id: UUID):
        return super().post(request, workflow_id)

    def act(self, workflow_id, user, agent):
        return workflow_control.workflow_pause(workflow_id=workflow_id, user=user, agent=agent)


class WorkflowResumeView(_WorkflowControl):
    action_name = "resume"

    @extend_schema(operation_id="resume_workflow", summary="Resume a paused workflow", request=None,
                   responses=_CONTROL_RESPONSES)
    def post(self, request, workflow_id: UUID):
        return super().post(request, workflow_id)

    def act(self, workflow_id, user, agent):
        return workflow_control.workflow_resume(workflow_id=workflow_id, user=user, agent=agent)


class WorkflowEventsView(APIBase):
    query_params_allowed = frozenset({"after", "limit"})
    @extend_schema(
        operation_id="workflow_events",
        summary="The workflow's ordered event log",
        parameters=[
            OpenApiParameter("after", {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}, required=False,
                             description="Only events with a larger seq."),
            OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, required=False,
                             description="At most this many (default 500)."),
        ],
        responses={200: s.EventPageSerializer, **BAD_REQUEST, **AUTH_ERRORS, **NOT_FOUND},
    )
    def get(self, request, workflow_id: UUID):
        after = _int_param(request, "after", 0, 0, MAX_SEQ)
        limit = _int_param(request, "limit", 500, 1, 1000)
        workflow = selectors.workflow_get(workflow_id=workflow_id)
        events, has_more = selectors.workflow_events(workflow=workflow, after=after, limit=limit)
        return _no_store(Response(s.EventPageSerializer({
            "workflow_id": workflow.id,
            "events": events,
            "last_seq": events[-1].seq if events else after,
            "has_more": has_more,
        }).data))


def _filter_param(request, name: str) -> str | None:
    """A name to filter by, or None when absent; empty is refused: it names nothing, so it is likely a mistake."""
    value = request.query_params.get(name)
    if value == "":
        raise InvalidRequest(f"{name}= is empty: give a name, or leave the parameter out.")
    return value


def _int_param(request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name}={raw!r} is not a whole number.") from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name}={value} is out of range {low}..{high}.")
    return value


class WorkflowAuditsView(APIBase):
    permission_classes = [IsAuthenticated, CanSubmit]

    @extend_schema(operation_id="workflow_audits", summary="The workflow's audit reports, newest first",
                   responses={200: s.AuditOutSerializer(many=True), **AUTH_ERRORS, **NOT_FOUND})
    def get(self, request, workflow_id: UUID):
        workflow = selectors.workflow_get(workflow_id=workflow_id)
        return Response(s.AuditOutSerializer(selectors.workflow_audits(workflow=workflow), many=True).data)

    @extend_schema(operation_id="request_audit", summary="Audit a completed workflow now (runs in a Celery worker)",
                   request=None,
                   responses={202: s.WorkflowStatusSerializer, 409: _error("invalid_state: the workflow is not completed."),
                              **AUTH_ERRORS, **NOT_FOUND})
    def post(self, request, workflow_id: UUID):
        if request.data:
            raise InvalidRequest("An audit request takes no fields.")
        user, agent = _user_and_agent(request)
        workflow = audits.workflow_audit_request(workflow_id=workflow_id, user=user, agent=agent)
        return Response(s.WorkflowStatusSerializer(workflow).data, status=status.HTTP_202_ACCEPTED)


# --- steps -------------------------------------------------------------------


class StepDetailView(APIBase):
    @extend_schema(operation_id="get_step", summary="One step", responses={200: s.StepOutSerializer, **AUTH_ERRORS, **NOT_FOUND})
    def get(self, request, step_id: UUID):
        step = selectors.step_get(step_id=step_id)
        depends_on = sorted(step.depends_on.values_list("key", flat=True))
        return Response(s.StepOutSerializer(step, context={"depends_on": {step.id: depends_on}}).data)


class StepRetryView(APIBase):
    permission_classes = [IsAuthenticated, CanSubmit]

    @extend_schema(
        operation_id="retry_step",
        summary="A failed or cancelled step back to ready; its skipped dependents back to pending",
        request=None,
        responses={200: s.StepOutSerializer, 409: _error("invalid_state: the step is not failed or cancelled."),
                   **AUTH_ERRORS, **NOT_FOUND},
    )
    def post(self, request, step_id: UUID):
        if request.data:
            raise InvalidRequest("retry takes no fields.")
        user, agent = _user_and_agent(request)
        step = workflow_control.step_retry(step_id=step_id, user=user, agent=agent)
        depends_on = sorted(step.depends_on.values_list("key", flat=True))
        return Response(s.StepOutSerializer(step, context={"depends_on": {step.id: depends_on}}).data)


# --- agents ------------------------------------------------------------------


def _agent_payload(agent) -> dict:
    return s.AgentOutSerializer({
        "id": agent.id, "name": agent.name, "roles": agent.roles, "capacity": agent.capacity,
        "can_submit": agent.can_submit, "enabled": agent.enabled, "online": bool(agent.online_q),
        "last_seen_at": agent.last_seen_at, "steps_held": agent.steps_held, "locks_held": agent.locks_held,
        "tokens_used": agent.tokens_used, "cost_usd": agent.cost_usd,
    }).data


class AgentListView(APIBase):
    @extend_schema(operation_id="list_agents", summary="Agents, with what they hold and whether they are online",
                   responses={200: s.AgentOutSerializer(many=True), **AUTH_ERRORS})
    def get(self, request):
        return Response([_agent_payload(agent) for agent in selectors.agents_with_load()])


class AgentMeView(APIBase):
    permission_classes = [IsAgent]

    @extend_schema(operation_id="agent_me", summary="The calling agent", responses={200: s.AgentOutSerializer, **AUTH_ERRORS})
    def get(self, request):
        agent = selectors.agents_with_load().get(id=request_agent(request).id)
        return Response(_agent_payload(agent))



# --- file locks ----------------------------------------------------------------


class LockListView(APIBase):
    query_params_allowed = frozenset({"project", "path", "agent"})

    @extend_schema(
        operation_id="list_locks",
        summary="Live file locks (not released, not expired)",
        parameters=[
            OpenApiParameter("project", FILTER_SCHEMA, required=False, description="A project's name."),
            OpenApiParameter("path", PATH_SCHEMA, required=False,
                             description="Locks that overlap this path (a directory covers what is under it)."),
            OpenApiParameter("agent", FILTER_SCHEMA, required=False, description="Holder's agent name."),
        ],
        responses={200: s.LockListSerializer, **BAD_REQUEST, **AUTH_ERRORS},
    )
    def get(self, request):
        path = request.query_params.get("path")
        locks = selectors.locks_live(project=_filter_param(request, "project"),
                                     path=normalise_path(path) if path is not None else None,
                                     agent=_filter_param(request, "agent"))
        return _no_store(Response(s.LockListSerializer({"locks": locks}).data))

    @extend_schema(
        operation_id="acquire_locks",
        summary="Lock paths of a project's workspace: all or none",
        description=(
            "`read` locks are shared, `write` locks are alone; a path ending in `/` covers everything under it. "
            "With `wait_s` the request queues behind earlier ones and waits for the holders to go. Under a step "
            "lease (`step_id` + `lease_token`) the locks follow the lease and end with the step."
        ),
        request=s.LockInSerializer,
        responses={
            201: s.LockListSerializer,
            400: _error("invalid_path (absolute, climbs out with '..', empty, NUL) or invalid_request."),
            409: OpenApiResponse(s.LockConflictSerializer, description="lock_conflict, or stale_lease for a lease that ended."),
            **AUTH_ERRORS, **NOT_FOUND, **TOO_LARGE,
        },
    )
    def post(self, request):
        agent = request_agent(request)
        if agent is None:
            raise Forbidden("Only agents take locks; people release them from the dashboard or the admin.")
        body = s.LockInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        locks = file_locks.locks_acquire(
            agent=agent, paths=data["paths"], mode=data["mode"], project_name=data.get("project"),
            step_id=data.get("step_id"), lease_token=data.get("lease_token"), ttl_s=data.get("ttl_s"),
            wait_s=data["wait_s"], release_connection=pull.release_idle_connection,
        )
        # The granted locks come back with their project and holder: no second read.
        locks = sorted(locks, key=lambda lock: lock.path)
        return _no_store(Response(s.LockListSerializer({"locks": locks}).data, status=status.HTTP_201_CREATED))


class LockDetailView(APIBase):
    @extend_schema(operation_id="release_lock", summary="Release a lock (its holder, or staff)",
                   responses={204: OpenApiResponse(description="Released (or it was already)."), **AUTH_ERRORS,
                              **NOT_FOUND})
    def delete(self, request, lock_id: UUID):
        user, agent = _user_and_agent(request)
        file_locks.lock_release(lock_id=lock_id, agent=agent, user=user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class LockRenewView(APIBase):
    @extend_schema(operation_id="renew_lock", summary="Extend a live lock by ttl_s from now (its holder, or staff)",
                   request=s.LockRenewInSerializer,
                   responses={200: s.LockOutSerializer, 409: _error("The lock expired or was released: acquire it again."),
                              **BAD_REQUEST, **AUTH_ERRORS, **NOT_FOUND})
    def post(self, request, lock_id: UUID):
        body = s.LockRenewInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user, agent = _user_and_agent(request)
        lock = file_locks.lock_renew(lock_id=lock_id, ttl_s=body.validated_data["ttl_s"], agent=agent, user=user)
        return _no_store(Response(s.LockOutSerializer(selectors.locks_by_id([lock.id])[0]).data))
