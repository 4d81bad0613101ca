"""Request validation and response shapes of the worker API (see shared/api-v1.md).

Request serializers refuse unknown fields, so that a typo never passes silently.
"""

import copy
from decimal import ROUND_HALF_EVEN, Decimal

from django.conf import settings
from rest_framework import serializers

from agents.llm.base import Usage
from coordination import tracing
from coordination.api.schema import BIGINT_MAX, KEY_SCHEMA, NOT_BLANK, PATH_SCHEMA, PROJECT_SCHEMA, ROLE_SCHEMA, documented
from coordination.models import LockMode
from coordination.services import leases, pull, reports, workflow_specs

MAX_TEXT = 1_000_000


def _check_json(value, path: str = "") -> None:
    """PostgreSQL's jsonb cannot hold a NUL character: refuse it with its place."""
    if isinstance(value, str):
        if "\x00" in value:
            raise serializers.ValidationError(f"{path or 'value'} contains a NUL character (\\u0000), which cannot be stored.")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, f"{path}.{key}" if path else "a key")
            _check_json(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")


class JSONObjectField(serializers.DictField):
    """A free-form JSON object (outputs, metadata) that PostgreSQL can store."""

    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", "Any JSON object whose strings, keys and values alike, hold no NUL (\\u0000): "
                                       "PostgreSQL cannot store it (invalid_request). OpenAPI 3.0 cannot say that of "
                                       "an object's keys.")
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        _check_json(value)
        return value


class StrictCharField(serializers.CharField):
    """A JSON string, not a number or a boolean coerced into one."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: not a string, a boolean or a fraction."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictDecimalField(serializers.DecimalField):
    """A JSON number, rounded half-even to `decimal_places`: a float such as 0.1 + 0.2 (0.30000000000000004) is an
    amount, not a mistake. The bounds are checked before rounding, so that a value past one is refused rather
    than rounded onto it, and a value within them stays within them."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        value = Decimal(str(data))  # str: the float as written (0.1), not its binary expansion
        if not value.is_finite():
            self.fail("invalid")
        if self.max_value is not None and value > self.max_value:
            self.fail("max_value", max_value=self.max_value)
        if self.min_value is not None and value < self.min_value:
            self.fail("min_value", min_value=self.min_value)
        return super().to_internal_value(str(value.quantize(Decimal(1).scaleb(-self.decimal_places),
                                                            rounding=ROUND_HALF_EVEN)))


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


def _field_copy(field):
    """A copy of a declared field with a state of its own: a shallow copy (what never changes once a field is
    built, its validators, choices and error messages, is shared), with its own child field for a list or a
    dict (its parent the copy), and no fields computed yet for a nested serializer (it makes its own)."""
    new = copy.copy(field)
    new.__dict__.pop("fields", None)
    child = getattr(field, "child", None)
    if child is not None:
        new.child = _field_copy(child)
        new.child.parent = new  # bound already by the declared field's init: named '', its source ''
    return new


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, and bodies that are not JSON objects."""

    # Merged into the body's OpenAPI schema (coordination/api/schema.py): the rules between fields that
    # `validate` checks, said as anyOf / oneOf, so that a generated client knows them too.
    schema_extra: dict = {}

    def get_fields(self):
        """Copies of the class's declared fields (`_field_copy`), which `bind` then names and parents. DRF
        deep-copies them, building every field anew on every request (a fifth of the time a lock or report body
        takes to parse)."""
        return {name: _field_copy(field) for name, field in self._declared_fields.items()}

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError(
                {"non_field_errors": [f"Expected a JSON object, got {type(data).__name__}."]}
            )
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                {name: [f"Unknown field {name!r}; known fields: {', '.join(sorted(self.fields))}."] for name in unknown}
            )
        return super().to_internal_value(data)


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="A stable code: invalid_request, stale_lease, at_capacity, ...")
    detail = serializers.CharField(help_text="A sentence a person can act on.")
    errors = serializers.JSONField(
        required=False,
        help_text=(
            "invalid_request: {field: [messages]}; invalid_workflow: a list of problems, "
            "each {code, detail, step?, cycle?, depends_on?}."
        ),
    )


class FileInSerializer(StrictSerializer):
    path = documented(StrictCharField(max_length=1024, trim_whitespace=False), **PATH_SCHEMA)
    mode = serializers.ChoiceField(choices=LockMode.choices, default=LockMode.WRITE)


class StepInSerializer(StrictSerializer):
    key = documented(StrictCharField(max_length=100, trim_whitespace=False), **KEY_SCHEMA,
                     description="Unique in the workflow (else invalid_workflow: duplicate_key).")
    name = documented(StrictCharField(max_length=200, required=False, allow_blank=True),
                      description="Default (also when empty or only whitespace): the key.")
    description = StrictCharField(max_length=MAX_TEXT, required=False, allow_blank=True, default="")
    role = documented(StrictCharField(max_length=64, trim_whitespace=False), **ROLE_SCHEMA)
    depends_on = documented(
        serializers.ListField(child=documented(StrictCharField(max_length=100), **KEY_SCHEMA), required=False,
                              default=list),
        description="Keys of other steps of this workflow, each once, without cycles; a key that names no step "
                    "is invalid_workflow (unknown_dependency), which OpenAPI cannot say.",
    )
    files = FileInSerializer(many=True, required=False, default=list)
    priority = StrictIntegerField(required=False, default=0, min_value=-1_000_000, max_value=1_000_000)
    max_attempts = StrictIntegerField(required=False, allow_null=True, min_value=1, max_value=100)
    lease_ttl_s = StrictIntegerField(required=False, allow_null=True, min_value=5, max_value=7 * 86400)


class BudgetSerializer(StrictSerializer):
    usd = documented(
        StrictDecimalField(max_digits=12, decimal_places=4, required=False, allow_null=True,
                           min_value=Decimal("0.0001"), max_value=Decimal("99999999.9999")),
        maximum=99999999.9999, exclusiveMaximum=False, description="Rounded to 4 decimal places.",
    )
    tokens = StrictIntegerField(required=False, allow_null=True, min_value=1, max_value=BIGINT_MAX)


class WorkflowInSerializer(StrictSerializer):
    """A workflow: give `steps`, or a non-blank `goal` for the planner (or both).

    The steps form a graph: keys unique, `depends_on` naming keys of this workflow, no step depending on
    itself, no cycle. A graph breaking these is 400 invalid_workflow, each problem in `errors` (OpenAPI
    cannot say these rules, which relate one item of `steps` to the others).
    """

    schema_extra = {"anyOf": [{"required": ["steps"], "properties": {"steps": {"minItems": 1}}},
                              {"required": ["goal"], "properties": {"goal": {"pattern": NOT_BLANK}}}]}

    name = documented(StrictCharField(max_length=200), pattern=NOT_BLANK)
    project = documented(StrictCharField(max_length=64, required=False, default="default"), **PROJECT_SCHEMA)
    goal = StrictCharField(max_length=MAX_TEXT, required=False, allow_blank=True, default="")
    priority = StrictIntegerField(required=False, default=0, min_value=-1_000_000, max_value=1_000_000)
    max_attempts = StrictIntegerField(required=False, allow_null=True, min_value=1, max_value=100)
    max_rework_rounds = StrictIntegerField(required=False, default=1, min_value=0, max_value=10)
    budget = BudgetSerializer(required=False, allow_null=True)
    metadata = JSONObjectField(required=False, default=dict)
    steps = StepInSerializer(many=True, required=False, default=list)

    def validate_steps(self, steps):
        limit = settings.AM_MAX_STEPS_PER_WORKFLOW
        if len(steps) > limit:
            raise serializers.ValidationError(f"{len(steps)} steps; the limit is {limit} (AM_MAX_STEPS_PER_WORKFLOW).")
        return steps

    def validate(self, data):
        if not data.get("steps") and not data.get("goal", "").strip():
            raise serializers.ValidationError("Give either steps, or a goal for the planner.")
        return data

    def to_spec(self) -> workflow_specs.WorkflowSpec:
        data = self.validated_data
        budget = data.get("budget") or {}
        return workflow_specs.WorkflowSpec(
            name=data["name"],
            project=data["project"],
            goal=data["goal"],
            priority=data["priority"],
            max_attempts=data.get("max_attempts"),
            max_rework_rounds=data["max_rework_rounds"],
            budget_usd=budget.get("usd"),
            budget_tokens=budget.get("tokens"),
            metadata=data["metadata"],
            steps=tuple(
                workflow_specs.StepSpec(
                    key=step["key"],
                    name=step.get("name") or step["key"],
                    role=step["role"],
                    description=step["description"],
                    depends_on=tuple(step["depends_on"]),
                    files=tuple(workflow_specs.FileSpec(path=f["path"], mode=f["mode"]) for f in step["files"]),
                    priority=step["priority"],
                    max_attempts=step.get("max_attempts"),
                    lease_ttl_s=step.get("lease_ttl_s"),
                )
                for step in data["steps"]
            ),
        )


class IterationSerializer(StrictSerializer):
    iteration = StrictIntegerField(min_value=0, max_value=1_000_000)
    thought = StrictCharField(max_length=MAX_TEXT, required=False, allow_blank=True, default="", trim_whitespace=False)
    action = StrictCharField(max_length=MAX_TEXT, required=False, allow_blank=True, default="", trim_whitespace=False)
    observation = StrictCharField(
        max_length=MAX_TEXT, required=False, allow_blank=True, default="", trim_whitespace=False
    )


def to_iterations(items) -> list[leases.IterationIn]:
    return [
        leases.IterationIn(index=i["iteration"], thought=i["thought"], action=i["action"], observation=i["observation"])
        for i in items
    ]


class HeartbeatInSerializer(StrictSerializer):
    lease_token = StrictCharField(max_length=200)
    iterations = IterationSerializer(many=True, required=False, default=list, max_length=1000)


class HeartbeatOutSerializer(serializers.Serializer):
    expires_at = serializers.DateTimeField()
    cancel = StrictBooleanField(help_text="True asks the agent to stop: the workflow was cancelled or paused.")


class UsageSerializer(StrictSerializer):
    model = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    prompt_tokens = StrictIntegerField(min_value=0, max_value=10**12, required=False, default=0)
    completion_tokens = StrictIntegerField(min_value=0, max_value=10**12, required=False, default=0)
    cost_usd = documented(
        StrictDecimalField(max_digits=14, decimal_places=6, min_value=Decimal(0), max_value=Decimal("99999999.999999"),
                           required=False, default=Decimal(0)),
        maximum=99999999.999999, exclusiveMaximum=False, description="Rounded to 6 decimal places.",
    )


class ReportInSerializer(StrictSerializer):
    step_id = serializers.UUIDField()
    lease_token = StrictCharField(max_length=200)
    status = serializers.ChoiceField(choices=[("completed", "completed"), ("failed", "failed")])
    final_result = StrictCharField(max_length=MAX_TEXT, required=False, allow_blank=True, default="", trim_whitespace=False)
    outputs = JSONObjectField(required=False, default=dict)
    iterations = IterationSerializer(many=True, required=False, default=list, max_length=10000)
    usage = UsageSerializer(required=False, allow_null=True)
    execution_time_s = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=10**7)
    error = StrictCharField(max_length=MAX_TEXT, required=False, allow_null=True, allow_blank=True)
    retryable = StrictBooleanField(required=False, default=False)

    def to_outcome(self) -> reports.Outcome:
        data = self.validated_data
        usage = data.get("usage") or {}
        return reports.Outcome(
            status=data["status"],
            final_result=data["final_result"],
            outputs=data["outputs"],
            iterations=to_iterations(data["iterations"]),
            usage=Usage(
                model=usage.get("model", ""),
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
                cost_usd=usage.get("cost_usd", Decimal(0)),
            ),
            execution_time_s=data.get("execution_time_s"),
            error=data.get("error") or "",
            retryable=data["retryable"],
        )


class ReportOutSerializer(serializers.Serializer):
    step_id = serializers.UUIDField()
    status = StrictCharField()
    workflow_status = StrictCharField()
    released = serializers.ListField(child=StrictCharField(), help_text="Keys of the steps that became ready.")


class LeaseTokenInSerializer(StrictSerializer):
    lease_token = StrictCharField(max_length=200)


class StepStatusOutSerializer(serializers.Serializer):
    step_id = serializers.UUIDField()
    status = StrictCharField()


class RawPathField(serializers.Field):
    """A path handed as is to the normaliser, which answers every bad form with `invalid_path`."""

    def to_internal_value(self, data):
        return data

    def to_representation(self, value):
        return value


class LockInSerializer(StrictSerializer):
    """Locks on paths; `step_id` and `lease_token` go together (one without the other is invalid_request)."""

    # Both, or neither (OpenAPI 3.1 would say `dependentRequired`; 3.0 says it with anyOf).
    schema_extra = {"anyOf": [{"required": ["step_id", "lease_token"]},
                              {"not": {"anyOf": [{"required": ["step_id"]}, {"required": ["lease_token"]}]}}]}

    project = documented(
        StrictCharField(max_length=64, required=False), pattern=NOT_BLANK,
        description="Default: the step's project, else 'default'. A project that does not exist is not_found "
                    "(404), except 'default', which is created.",
    )
    paths = serializers.ListField(
        child=documented(RawPathField(), **PATH_SCHEMA), min_length=1, max_length=200,
        help_text="Relative POSIX paths; a trailing '/' locks a directory and everything under it.",
    )
    mode = serializers.ChoiceField(choices=LockMode.choices)
    step_id = serializers.UUIDField(required=False, help_text="Take the locks under this step's lease.")
    lease_token = StrictCharField(max_length=200, required=False)
    ttl_s = StrictIntegerField(required=False, min_value=1, max_value=3600,
                               help_text="Default 300; locks under a lease follow the lease instead.")
    wait_s = StrictFloatField(required=False, default=0, min_value=0, max_value=30)


class LockRenewInSerializer(StrictSerializer):
    ttl_s = StrictIntegerField(min_value=1, max_value=3600)


# --- responses -------------------------------------------------------------


class LeaseLockSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    path = serializers.CharField()
    mode = serializers.CharField()
    fencing = serializers.IntegerField(help_text="Send it as X-AM-Fencing to write the path.")
    expires_at = serializers.DateTimeField()


class LeaseOutSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Secret: send it with heartbeats, reports and locks.")
    expires_at = serializers.DateTimeField()
    ttl_s = serializers.IntegerField()
    locks = LeaseLockSerializer(many=True, help_text="The locks granted with the lease for the step's declared files.")
    traceparent = serializers.CharField(
        allow_null=True,
        help_text="W3C trace context of this attempt's span (`00-<trace id>-<span id>-01`; the trace id is the "
                  "workflow's), when the server exports OpenTelemetry traces; null otherwise. A worker that "
                  "traces makes its spans for the step children of it.")


class PulledStepSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    key = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    role = serializers.CharField()
    attempt = serializers.IntegerField()
    files = serializers.ListField(child=serializers.DictField())
    inputs = serializers.DictField(help_text="Results of the step's dependencies by key: {final_result, outputs}.")


class WorkflowRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    project = serializers.CharField()


class PullOutSerializer(serializers.Serializer):
    step = PulledStepSerializer()
    workflow = WorkflowRefSerializer()
    lease = LeaseOutSerializer()


class BatchPullOutSerializer(serializers.Serializer):
    leases = PullOutSerializer(many=True, help_text="The leased steps, best first, each with its own lease token.")


# The API's one date-time format (ISO 8601, UTC as "Z"), for answers built without a serializer.
_DATETIME = serializers.DateTimeField()


def pull_payload(lease: pull.Lease) -> dict:
    """A lease as the API answers it, in JSON types: `PullOutSerializer`'s shape, built without instantiating
    it (a serializer deep-copies its fields on every use, and this is every pull). A test pins the two equal."""
    step = lease.step
    workflow = step.workflow
    return {
        "step": {
            "id": str(step.id),
            "key": step.key,
            "name": step.name,
            "description": step.description,
            "role": step.role,
            "attempt": step.attempt,
            "files": step.files,
            "inputs": lease.inputs,
        },
        "workflow": {"id": str(workflow.id), "name": workflow.name, "project": workflow.project.name},
        "lease": {"token": lease.token, "expires_at": _DATETIME.to_representation(lease.expires_at),
                  "ttl_s": step.lease_ttl_s,
                  "locks": [{"id": str(lock.id), "path": lock.path, "mode": lock.mode, "fencing": lock.fencing,
                             "expires_at": _DATETIME.to_representation(lock.expires_at)} for lock in lease.locks],
                  "traceparent": tracing.attempt_traceparent(workflow_id=step.workflow_id,
                                                             attempt_id=lease.attempt.id)},
    }


def report_payload(result: dict) -> dict:
    """A report's answer as the API gives it: `ReportOutSerializer`'s shape, built directly (every report)."""
    return {"step_id": str(result["step_id"]), "status": str(result["status"]),
            "workflow_status": str(result["workflow_status"]), "released": [str(key) for key in result["released"]]}


class CountsSerializer(serializers.Serializer):
    pending = serializers.IntegerField()
    ready = serializers.IntegerField()
    in_progress = serializers.IntegerField()
    completed = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()
    skipped = serializers.IntegerField()


class BudgetOutSerializer(serializers.Serializer):
    usd = serializers.DecimalField(max_digits=12, decimal_places=4, allow_null=True, coerce_to_string=False)
    tokens = serializers.IntegerField(allow_null=True)


class SpentSerializer(serializers.Serializer):
    usd = serializers.DecimalField(max_digits=14, decimal_places=6, coerce_to_string=False)
    tokens = serializers.IntegerField()


class WorkflowStatusSerializer(serializers.Serializer):
    workflow_id = serializers.UUIDField(source="id")
    status = serializers.CharField()
    paused_reason = serializers.CharField()
    total_steps = serializers.IntegerField()
    counts = CountsSerializer()
    progress = serializers.FloatField()
    is_complete = serializers.SerializerMethodField()
    audit_status = serializers.CharField(allow_null=True)
    rework_round = serializers.IntegerField()
    spent = serializers.SerializerMethodField()
    budget = serializers.SerializerMethodField()
    updated_at = serializers.DateTimeField()

    def get_is_complete(self, workflow) -> bool:
        return workflow.is_terminal

    def get_spent(self, workflow) -> SpentSerializer:
        return {"usd": float(workflow.spent_usd), "tokens": workflow.spent_tokens}

    def get_budget(self, workflow) -> BudgetOutSerializer:
        return {"usd": float(workflow.budget_usd) if workflow.budget_usd is not None else None,
                "tokens": workflow.budget_tokens}


class StepOutSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    key = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    role = serializers.CharField()
    status = serializers.CharField()
    priority = serializers.IntegerField()
    attempt = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    lease_ttl_s = serializers.IntegerField()
    depends_on = serializers.SerializerMethodField()
    files = serializers.ListField(child=serializers.DictField())
    final_result = serializers.CharField()
    outputs = serializers.DictField()
    error = serializers.CharField()
    leased_to = serializers.SerializerMethodField()
    lease_expires_at = serializers.DateTimeField(allow_null=True)
    available_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)

    def get_depends_on(self, step) -> list[str]:
        return self.context.get("depends_on", {}).get(step.id, [])

    def get_leased_to(self, step) -> str | None:
        if step.status != "in_progress" or step.lease_agent is None:
            return None
        return step.lease_agent.name


class WorkflowOutSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    project = serializers.CharField(source="project.name")
    goal = serializers.CharField()
    status = serializers.CharField()
    paused_reason = serializers.CharField()
    failure_reason = serializers.CharField()
    audit_status = serializers.CharField(allow_null=True)
    priority = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    max_rework_rounds = serializers.IntegerField()
    rework_round = serializers.IntegerField()
    budget = serializers.SerializerMethodField()
    spent = serializers.SerializerMethodField()
    metadata = serializers.DictField()
    synthesis = serializers.CharField()
    total_steps = serializers.IntegerField()
    counts = CountsSerializer()
    progress = serializers.FloatField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)

    def get_budget(self, workflow) -> BudgetOutSerializer:
        return {
            "usd": float(workflow.budget_usd) if workflow.budget_usd is not None else None,
            "tokens": workflow.budget_tokens,
        }

    def get_spent(self, workflow) -> SpentSerializer:
        return {"usd": float(workflow.spent_usd), "tokens": workflow.spent_tokens}


class WorkflowPageSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = WorkflowOutSerializer(many=True)


class WorkflowDetailSerializer(WorkflowOutSerializer):
    steps = serializers.SerializerMethodField()

    def get_steps(self, workflow) -> StepOutSerializer(many=True):
        return StepOutSerializer(self.context["steps"], many=True, context=self.context).data


class EventOutSerializer(serializers.Serializer):
    seq = serializers.IntegerField(help_text=(
        "The event's place in the log: larger along it, not consecutive (its transaction's number times 2**20, "
        "plus its rank there). An event shows once every change that began writing before it has ended, so "
        "going on from the last seq seen (?after=) misses none. Beyond 2**53: read it as a 64-bit integer."))
    kind = serializers.CharField()
    at = serializers.DateTimeField()
    step_id = serializers.UUIDField(allow_null=True)
    agent_id = serializers.UUIDField(allow_null=True)
    data = serializers.DictField()


class EventPageSerializer(serializers.Serializer):
    workflow_id = serializers.UUIDField()
    events = EventOutSerializer(many=True)
    last_seq = serializers.IntegerField(help_text="Pass it as ?after= to get what follows.")
    has_more = serializers.BooleanField()


class AuditOutSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    round = serializers.IntegerField()
    successful = serializers.BooleanField()
    feedback = serializers.CharField()
    rework_suggestions = serializers.ListField(child=serializers.DictField())
    confidence = serializers.FloatField()
    steps_reviewed = serializers.ListField()
    criteria = serializers.ListField()
    checks = serializers.ListField(child=serializers.DictField())
    reviewer = serializers.CharField()
    created_at = serializers.DateTimeField()


class AgentOutSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    roles = serializers.ListField(child=serializers.CharField())
    capacity = serializers.IntegerField()
    can_submit = serializers.BooleanField()
    enabled = serializers.BooleanField()
    online = serializers.BooleanField()
    last_seen_at = serializers.DateTimeField(allow_null=True)
    steps_held = serializers.IntegerField()
    locks_held = serializers.IntegerField()
    tokens_used = serializers.IntegerField(help_text="Prompt and completion tokens of every result it reported.")
    cost_usd = serializers.DecimalField(max_digits=14, decimal_places=6, coerce_to_string=False)


class LockOutSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    project = serializers.CharField(source="project.name")
    path = serializers.CharField()
    mode = serializers.CharField()
    fencing = serializers.IntegerField(help_text="Grows with every grant of this path: tells a stale holder apart.")
    held_by = serializers.SerializerMethodField()
    step_id = serializers.UUIDField(allow_null=True)
    acquired_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    released_at = serializers.DateTimeField(allow_null=True)

    def get_held_by(self, lock) -> str | None:
        return lock.agent.name if lock.agent else None


class LockListSerializer(serializers.Serializer):
    locks = LockOutSerializer(many=True)


class LockConflictSerializer(serializers.Serializer):
    error = serializers.CharField()
    detail = serializers.CharField()
    conflicts = serializers.ListField(child=serializers.DictField(),
                                      help_text="Each: path, mode, held_by, step_id, expires_at (queued: true for a request ahead).")
