"""The coordination domain: workflows of steps, leases, results, audits, locks, events.

Invariants live in the database wherever PostgreSQL can hold them (check and
unique constraints, partial indexes), so that no code path, however it reaches
the tables, can store a state the rest of the system cannot handle.
Models carry no behaviour beyond small derived properties: every write goes
through `coordination/services/`.
"""

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import MinValueValidator, RegexValidator
from django.db import connections, models
from django.db.models import F, Func, Q
from django.db.models.query import ModelIterable

ROLE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"
role_validator = RegexValidator(ROLE_PATTERN, "A role is a slug: a-z, 0-9, '_' and '-', 1 to 64 characters.")
key_validator = RegexValidator(
    KEY_PATTERN, "A step key is 1 to 100 letters, digits, '_', '.', ':' or '-', starting with a letter or digit."
)


def _choices_check(field: str, choices: type[models.TextChoices], name: str) -> models.CheckConstraint:
    return models.CheckConstraint(condition=Q(**{f"{field}__in": choices.values}), name=name)


class Project(models.Model):
    """The namespace of one shared workspace: file lock paths are relative to it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    # The workspace's version: one more with every change (a write, a delete, a batch), moved in the
    # transaction of the change.
    workspace_version = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["name"]
        constraints = [models.CheckConstraint(condition=Q(workspace_version__gte=0), name="project_version_positive")]

    def __str__(self) -> str:
        return self.name


class Agent(models.Model):
    """A worker identity: the roles it may pull, how many steps it may hold, its API token."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    roles = ArrayField(models.CharField(max_length=64, validators=[role_validator]), default=list)
    capacity = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    # SHA-256 of the bearer token; the token itself is shown once and never stored.
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_prefix = models.CharField(max_length=12, editable=False, help_text="First characters, to tell tokens apart.")
    can_submit = models.BooleanField(default=False, help_text="May create and control workflows.")
    enabled = models.BooleanField(default=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Bumped by every pull, under the row's lock: a pull done in one statement compares the value it locked
    # with the one its snapshot saw, to know that no other pull of this agent committed in between (and so
    # that the steps it counts as held are all of them). See `coordination.services.pull`.
    pull_seq = models.BigIntegerField(default=0, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(capacity__gte=1), name="agent_capacity_positive"),
        ]

    def __str__(self) -> str:
        return self.name


class UserToken(models.Model):
    """An API token that acts as a person (a pipeline or script run on their behalf)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="am_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_prefix = models.CharField(max_length=12, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} / {self.name}"


class WorkflowStatus(models.TextChoices):
    PLANNING = "planning"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AuditStatus(models.TextChoices):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


class StepStatus(models.TextChoices):
    PENDING = "pending"
    READY = "ready"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


# The per-status step counters kept on the workflow, by step status.
STEP_COUNTER_FIELDS = {status: f"n_{status}" for status in StepStatus.values}
TERMINAL_STEP_STATUSES = frozenset(
    {StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED}
)
TERMINAL_WORKFLOW_STATUSES = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})


# The counters and spend the hot paths move without touching the workflow row: each change of theirs inserts a
# `WorkflowDelta`, and a workflow's live figures are its row plus its deltas (`workflow_counters` folds them in).
LIVE_FIELDS = (*STEP_COUNTER_FIELDS.values(), "spent_usd", "spent_tokens")

# A plain constant (`test_write_guard` reads it): each workflow's row plus its deltas, in `LIVE_FIELDS` order
# (`test_workflow_deltas` pins it), read in one statement so that a fold committing meanwhile is counted once.
_LIVE_SQL = """
SELECT w.id, w.n_pending + coalesce(sum(d.n_pending), 0), w.n_ready + coalesce(sum(d.n_ready), 0),
       w.n_in_progress + coalesce(sum(d.n_in_progress), 0), w.n_completed + coalesce(sum(d.n_completed), 0),
       w.n_failed + coalesce(sum(d.n_failed), 0), w.n_cancelled + coalesce(sum(d.n_cancelled), 0),
       w.n_skipped + coalesce(sum(d.n_skipped), 0), w.spent_usd + coalesce(sum(d.spent_usd), 0),
       (w.spent_tokens + coalesce(sum(d.spent_tokens), 0))::bigint
FROM coordination_workflow w LEFT JOIN coordination_workflowdelta d ON d.workflow_id = w.id
WHERE w.id = ANY(%s) GROUP BY w.id
"""


class _LiveWorkflowIterable(ModelIterable):
    """Workflow instances with their live counters and spend (the row plus its deltas, one more query per 500
    rows), so that whatever reads a workflow through the ORM (API, dashboard, admin, services) sees them.
    A workflow reached through `select_related` is not: it carries its row's own figures."""

    def __iter__(self):
        batch: list = []
        for workflow in super().__iter__():
            batch.append(workflow)
            if len(batch) == 500:
                yield from self._live(batch)
                batch = []
        yield from self._live(batch)

    def _live(self, batch: list) -> list:
        if batch:
            with connections[self.queryset.db].cursor() as cursor:
                cursor.execute(_LIVE_SQL, [[workflow.id for workflow in batch]])
                live = {row[0]: row[1:] for row in cursor.fetchall()}
            for workflow in batch:
                deferred = workflow.get_deferred_fields()  # `only()`: nothing to set for what was not read
                for field, value in zip(LIVE_FIELDS, live.get(workflow.id, ())):
                    if field not in deferred:
                        setattr(workflow, field, value)
        return batch


class WorkflowQuerySet(models.QuerySet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._iterable_class = _LiveWorkflowIterable


class Workflow(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="workflows")
    name = models.CharField(max_length=200)
    goal = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=WorkflowStatus.choices, default=WorkflowStatus.RUNNING)
    paused_reason = models.CharField(max_length=200, blank=True, default="")
    failure_reason = models.TextField(blank=True, default="")
    audit_status = models.CharField(max_length=16, choices=AuditStatus.choices, null=True, blank=True)
    priority = models.IntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=3)
    max_rework_rounds = models.PositiveIntegerField(default=1)
    rework_round = models.PositiveIntegerField(default=0)
    budget_usd = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    budget_tokens = models.BigIntegerField(null=True, blank=True)
    spent_usd = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    spent_tokens = models.BigIntegerField(default=0)
    metadata = models.JSONField(default=dict, blank=True)
    synthesis = models.TextField(blank=True, default="")
    created_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="submitted_workflows"
    )
    # Step counters by status, moved in the same transaction as every step change (on this row, or by a
    # `WorkflowDelta` that is folded in later), so that the status endpoint costs the same for 10 steps or 10,000.
    total_steps = models.PositiveIntegerField(default=0)
    n_pending = models.IntegerField(default=0)
    n_ready = models.IntegerField(default=0)
    n_in_progress = models.IntegerField(default=0)
    n_completed = models.IntegerField(default=0)
    n_failed = models.IntegerField(default=0)
    n_cancelled = models.IntegerField(default=0)
    n_skipped = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = WorkflowQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        # Also for related access (`step.workflow`) and `refresh_from_db`: live counters everywhere.
        base_manager_name = "objects"
        indexes = [
            models.Index(fields=["project", "status", "-created_at"], name="workflow_project_status"),
            models.Index(fields=["status", "-created_at"], name="workflow_status_created"),
        ]
        constraints = [
            _choices_check("status", WorkflowStatus, "workflow_status_valid"),
            models.CheckConstraint(
                condition=Q(audit_status__isnull=True) | Q(audit_status__in=AuditStatus.values),
                name="workflow_audit_status_valid",
            ),
            models.CheckConstraint(condition=Q(max_attempts__gte=1), name="workflow_max_attempts_positive"),
            models.CheckConstraint(
                condition=Q(n_pending__gte=0)
                & Q(n_ready__gte=0)
                & Q(n_in_progress__gte=0)
                & Q(n_completed__gte=0)
                & Q(n_failed__gte=0)
                & Q(n_cancelled__gte=0)
                & Q(n_skipped__gte=0),
                name="workflow_counters_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(
                    total_steps=F("n_pending")
                    + F("n_ready")
                    + F("n_in_progress")
                    + F("n_completed")
                    + F("n_failed")
                    + F("n_cancelled")
                    + F("n_skipped")
                ),
                name="workflow_counters_sum_to_total",
            ),
            models.CheckConstraint(
                condition=Q(budget_usd__isnull=True) | Q(budget_usd__gt=0), name="workflow_budget_usd_positive"
            ),
            models.CheckConstraint(
                condition=Q(budget_tokens__isnull=True) | Q(budget_tokens__gt=0),
                name="workflow_budget_tokens_positive",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, update_fields=None, **kwargs):
        """Counters and spend are never written from an instance (it holds them live, deltas added): they move
        only by the services' SQL. Saving a stored workflow writes its other fields."""
        if not self._state.adding:
            if update_fields is None:
                update_fields = [field.name for field in self._meta.concrete_fields
                                 if not field.primary_key and field.name not in LIVE_FIELDS]
            elif set(update_fields) & set(LIVE_FIELDS):
                raise ValueError(f"{sorted(set(update_fields) & set(LIVE_FIELDS))} move only through "
                                 "coordination.services.workflow_counters.")
        super().save(*args, update_fields=update_fields, **kwargs)

    @property
    def counts(self) -> dict[str, int]:
        return {status: getattr(self, field) for status, field in STEP_COUNTER_FIELDS.items()}

    @property
    def progress(self) -> float:
        if not self.total_steps:
            return 0.0
        done = self.n_completed + self.n_failed + self.n_cancelled + self.n_skipped
        return round(done / self.total_steps, 4)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_WORKFLOW_STATUSES


class WorkflowDelta(models.Model):
    """One change's moves of a workflow's counters and spend, made by the hot paths (a pull, a report) without
    locking the workflow row; `workflow_counters` folds them into the row under its lock."""

    id = models.BigAutoField(primary_key=True)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="+")
    n_pending = models.IntegerField(db_default=0)
    n_ready = models.IntegerField(db_default=0)
    n_in_progress = models.IntegerField(db_default=0)
    n_completed = models.IntegerField(db_default=0)
    n_failed = models.IntegerField(db_default=0)
    n_cancelled = models.IntegerField(db_default=0)
    n_skipped = models.IntegerField(db_default=0)
    spent_usd = models.DecimalField(max_digits=14, decimal_places=6, db_default=0)
    spent_tokens = models.BigIntegerField(db_default=0)
    at = models.DateTimeField()

    def __str__(self) -> str:
        return f"delta of {self.workflow_id} at {self.at}"


class Step(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: `step_key_unique_in_workflow` and `step_workflow_status` start with it (every index
    # of a hot table is written on every change of a row: see BENCHMARKS.md section 8).
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="steps", db_index=False)
    key = models.CharField(max_length=100, validators=[key_validator])
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    role = models.CharField(max_length=64, validators=[role_validator])
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    priority = models.IntegerField(default=0)
    # The workflow's priority, copied so that the ready-queue index orders by it.
    workflow_priority = models.IntegerField(default=0)
    attempt = models.PositiveIntegerField(default=0, help_text="Leases granted so far.")
    max_attempts = models.PositiveIntegerField(default=3)
    lease_ttl_s = models.PositiveIntegerField(default=120)
    # Dependencies not completed yet; the step becomes ready when it reaches 0.
    remaining_deps = models.PositiveIntegerField(default=0)
    depends_on = models.ManyToManyField(
        "self", through="StepDependency", symmetrical=False, related_name="dependents"
    )
    # Declared files: [{"path": "src/app.py", "mode": "write"}], locked with the lease.
    files = models.JSONField(default=list, blank=True)
    # Inputs added by the server (an auditor's feedback for rework, a reviewer's comment).
    extra_inputs = models.JSONField(default=dict, blank=True)
    final_result = models.TextField(blank=True, default="")
    outputs = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    # When a ready step may be handed out (later than now during a retry backoff).
    available_at = models.DateTimeField(null=True, blank=True)
    # The current lease, while in progress.
    lease_agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="leased_steps", db_index=False
    )
    lease_token_hash = models.CharField(max_length=64, blank=True, default="", editable=False)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_attempt = models.ForeignKey(
        "Attempt", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False, db_index=False
    )
    # Leases handed back without fault (a pause, a worker shutting down): not charged
    # against max_attempts. Attempts used = attempt - attempts_released.
    attempts_released = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "key"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "key"], name="step_key_unique_in_workflow"),
            _choices_check("status", StepStatus, "step_status_valid"),
            models.CheckConstraint(condition=Q(role__regex=ROLE_PATTERN), name="step_role_is_slug"),
            models.CheckConstraint(condition=Q(max_attempts__gte=1), name="step_max_attempts_positive"),
            models.CheckConstraint(condition=Q(lease_ttl_s__gte=1), name="step_lease_ttl_positive"),
            models.CheckConstraint(
                condition=~Q(status=StepStatus.IN_PROGRESS)
                | (Q(lease_agent__isnull=False) & Q(lease_expires_at__isnull=False) & ~Q(lease_token_hash="")),
                name="step_in_progress_has_lease",
            ),
            models.CheckConstraint(
                condition=~Q(status=StepStatus.READY) | Q(remaining_deps=0),
                name="step_ready_has_no_open_deps",
            ),
        ]
        indexes = [
            # The pull: oldest ready step of the highest priority for a role. Partial,
            # so its size follows the ready queue, not the history of finished steps.
            models.Index(
                F("role"),
                F("workflow_priority").desc(),
                F("priority").desc(),
                F("available_at").asc(),
                name="step_ready_queue",
                condition=Q(status=StepStatus.READY),
            ),
            # The sweep: leases past their expiry.
            models.Index(
                fields=["lease_expires_at"],
                name="step_lease_expiry",
                condition=Q(status=StepStatus.IN_PROGRESS),
            ),
            models.Index(fields=["lease_agent"], name="step_leased_by", condition=Q(status=StepStatus.IN_PROGRESS)),
            models.Index(fields=["workflow", "status"], name="step_workflow_status"),
            # The foreign keys' own indexes (a deleted agent or attempt is looked up by them), without the NULLs
            # of every step not leased: a step changes status without writing to them.
            models.Index(fields=["lease_agent"], name="step_lease_agent", condition=Q(lease_agent__isnull=False)),
            models.Index(fields=["lease_attempt"], name="step_lease_attempt",
                         condition=Q(lease_attempt__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.key}: {self.name}"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STEP_STATUSES


class StepDependency(models.Model):
    """An edge of the DAG: `step` waits for `depends_on`."""

    id = models.BigAutoField(primary_key=True)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="+")
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="upstream_edges")
    depends_on = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="downstream_edges")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["step", "depends_on"], name="step_dependency_unique"),
            models.CheckConstraint(condition=~Q(step=F("depends_on")), name="step_dependency_not_self"),
        ]
        indexes = [models.Index(fields=["depends_on"], name="step_dependency_upstream")]


class AttemptOutcome(models.TextChoices):
    COMPLETED = "completed"
    FAILED = "failed"
    RETRY = "retry", "failed, retryable"
    EXPIRED = "expired", "lease expired"
    CANCELLED = "cancelled"
    RELEASED = "released", "handed back"


class Attempt(models.Model):
    """One lease of a step to an agent: the history of who held it and how it ended."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: `attempt_number_unique` starts with it.
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="attempts", db_index=False)
    agent = models.ForeignKey(Agent, null=True, on_delete=models.SET_NULL, related_name="attempts")
    number = models.PositiveIntegerField()
    lease_token_hash = models.CharField(max_length=64, editable=False)
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, blank=True, default="")

    class Meta:
        ordering = ["step", "number"]
        constraints = [
            models.UniqueConstraint(fields=["step", "number"], name="attempt_number_unique"),
            models.CheckConstraint(
                condition=Q(outcome="") | Q(outcome__in=AttemptOutcome.values), name="attempt_outcome_valid"
            ),
            # At most one open attempt per step: the database refuses a second lease.
            models.UniqueConstraint(fields=["step"], condition=Q(ended_at__isnull=True), name="attempt_one_open"),
        ]
        indexes = [
            models.Index(
                fields=["agent", "idempotency_key"],
                name="attempt_idempotency",
                condition=~Q(idempotency_key=""),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.step_id} #{self.number}"


class Iteration(models.Model):
    """One Reason+Act iteration of an attempt: streamed by heartbeats, completed by the report."""

    id = models.BigAutoField(primary_key=True)
    # No index of its own: `iteration_unique` starts with it.
    attempt = models.ForeignKey(Attempt, on_delete=models.CASCADE, related_name="iterations", db_index=False)
    index = models.PositiveIntegerField()
    thought = models.TextField(blank=True, default="")
    action = models.TextField(blank=True, default="")
    observation = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["attempt", "index"]
        constraints = [models.UniqueConstraint(fields=["attempt", "index"], name="iteration_unique")]


class Result(models.Model):
    """What an attempt reported: the answer, its Reason+Act history (`attempt.iterations`) and its cost."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    attempt = models.OneToOneField(Attempt, on_delete=models.CASCADE, related_name="result")
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="results")
    status = models.CharField(max_length=16, choices=[("completed", "completed"), ("failed", "failed")])
    final_result = models.TextField(blank=True, default="")
    outputs = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    retryable = models.BooleanField(default=False)
    model = models.CharField(max_length=200, blank=True, default="")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    execution_time_s = models.FloatField(null=True, blank=True)
    # The exact answer given to the report, returned again to a repeated report.
    response = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=["completed", "failed"]), name="result_status_valid"),
            models.CheckConstraint(
                condition=Q(prompt_tokens__gte=0) & Q(completion_tokens__gte=0) & Q(cost_usd__gte=0),
                name="result_usage_non_negative",
            ),
        ]

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class AgentUsage(models.Model):
    """What an agent's reports added up to, kept as each result is stored, so reading it costs the same
    whatever the history (the agent list, `/v1/agents/me`, the dashboard)."""

    agent = models.OneToOneField(Agent, primary_key=True, on_delete=models.CASCADE, related_name="usage")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    steps_completed = models.BigIntegerField(default=0)
    steps_failed = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"usage of {self.agent_id}"


class AuditReport(models.Model):
    """The judgement of a finished workflow, as the original AgentManager design has it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="audits")
    round = models.PositiveIntegerField(default=0, help_text="Rework round the audit judged.")
    successful = models.BooleanField()
    feedback = models.TextField(blank=True, default="")
    # [{"step": "B", "reason": "..."}]: the steps to send back, and why.
    rework_suggestions = models.JSONField(default=list, blank=True)
    confidence = models.FloatField(default=0.0)
    steps_reviewed = models.JSONField(default=list, blank=True)
    criteria = models.JSONField(default=list, blank=True)
    # The deterministic checks run: [{"name": "...", "passed": true, "detail": "..."}].
    checks = models.JSONField(default=list, blank=True)
    reviewer = models.CharField(max_length=200, blank=True, default="", help_text="The LLM model, or 'checks'.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(confidence__gte=0.0) & Q(confidence__lte=1.0), name="audit_confidence_in_unit_range"
            ),
        ]


class LockMode(models.TextChoices):
    READ = "read"
    WRITE = "write"


class FileLock(models.Model):
    """A grant of a path in a project's workspace: read (shared) or write (alone).

    Rows are kept after release, so the grant history (acquired, released or
    expired) can be audited; a lock is live while `released_at` is null and
    `expires_at` is in the future.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="locks")
    # Normalised, relative, POSIX; a directory lock ends with "/".
    path = models.CharField(max_length=1024)
    mode = models.CharField(max_length=8, choices=LockMode.choices)
    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="locks")
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="locks")
    fencing = models.BigIntegerField()
    acquired_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    released_at = models.DateTimeField(null=True, blank=True)
    release_reason = models.CharField(max_length=32, blank=True, default="")

    class Meta:
        ordering = ["path", "acquired_at"]
        constraints = [
            _choices_check("mode", LockMode, "lock_mode_valid"),
            models.UniqueConstraint(fields=["project", "path", "fencing"], name="lock_fencing_unique_per_path"),
            models.CheckConstraint(condition=~Q(path="") & ~Q(path__startswith="/"), name="lock_path_relative"),
        ]
        indexes = [
            models.Index(fields=["project", "path"], name="lock_live_by_path", condition=Q(released_at__isnull=True)),
            models.Index(fields=["expires_at"], name="lock_live_expiry", condition=Q(released_at__isnull=True)),
            models.Index(fields=["step"], name="lock_live_by_step", condition=Q(released_at__isnull=True)),
            # An agent's live locks (the agent list counts them).
            models.Index(fields=["agent"], name="lock_live_by_agent", condition=Q(released_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"{self.mode} {self.path}"


# The events that record a workflow settling (finished, failed or cancelled).
SETTLED_EVENT_KINDS = ("workflow.completed", "workflow.failed", "workflow.cancelled")


class NextEventSeq(Func):
    """An event's `seq` (its column's default): its transaction's id times 2**20, plus its rank in that
    transaction. Events are read below the oldest transaction still running (`EVENT_SEQ_BOUND_SQL`), so the log
    only ever grows at its end for a reader, without a counter that every change must lock (migration 0010;
    `services.event_log` says what order that gives)."""

    function = "coordination_event_seq"
    template = "%(function)s()"
    output_field = models.BigIntegerField()


# Events with a smaller `seq` are final: no transaction still running can add one below it.
EVENT_SEQ_BOUND_SQL = "coordination_event_seq_bound()"
# The first `seq` of the caller's own transaction (NULL before it has written); its events span 2**20 numbers.
EVENT_SEQ_OWN_SQL = "coordination_event_seq_own()"
EVENT_SEQ_SPAN = 2**20


class Event(models.Model):
    """Append-only log of every state change, ordered by `seq` (see `NextEventSeq`)."""

    id = models.BigAutoField(primary_key=True)
    # No index of its own: `event_seq_unique_per_workflow` starts with it.
    workflow = models.ForeignKey(Workflow, null=True, blank=True, on_delete=models.CASCADE, related_name="events",
                                 db_index=False)
    seq = models.BigIntegerField(db_default=NextEventSeq(), editable=False)
    kind = models.CharField(max_length=64)
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    data = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "seq"], name="event_seq_unique_per_workflow"),
        ]
        indexes = [
            models.Index(fields=["-at"], name="event_recent"),
            # A workflow's settling events (`coordination.tracing` sends a workflow's root span the first time
            # it settles): partial, so no other event writes to it and its size follows the settles.
            models.Index(fields=["workflow"], name="event_workflow_settled",
                         condition=Q(kind__in=SETTLED_EVENT_KINDS)),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.seq}"


class LockFence(models.Model):
    """The last fencing number granted for a path in a project; each grant increments it."""

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    path = models.CharField(max_length=1024)
    last = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "path"], name="lock_fence_unique_path")]


class LockWaiter(models.Model):
    """A lock request waiting its turn (`wait_s`): later requests for overlapping paths queue behind it."""

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    paths = ArrayField(models.CharField(max_length=1024))
    mode = models.CharField(max_length=8, choices=LockMode.choices)
    agent = models.ForeignKey(Agent, null=True, on_delete=models.CASCADE, related_name="+")
    step = models.ForeignKey(Step, null=True, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField()
    # A waiter whose request gave up (or whose process died) stops counting at its deadline.
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["project", "expires_at"], name="lock_waiter_active")]


class Blob(models.Model):
    """File contents, stored once per content (addressed by their SHA-256).

    In PostgreSQL (`data`) by default; above `AM_WORKSPACE_INLINE_MAX_BYTES`, in
    the Django storage named by `AM_WORKSPACE_STORAGE` when one is configured
    (`storage_name` is then its name there).
    """

    sha256 = models.CharField(max_length=64, primary_key=True)
    size = models.BigIntegerField()
    data = models.BinaryField(null=True, blank=True)
    storage_name = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(size__gte=0), name="blob_size_positive"),
            models.CheckConstraint(condition=Q(data__isnull=False) | ~Q(storage_name=""), name="blob_stored_somewhere"),
        ]


class FileVersion(models.Model):
    """One change of one path in a project's workspace: its content (or its deletion), and who made it, when,
    under which step, attempt and lock (fencing number)."""

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="file_versions")
    path = models.CharField(max_length=1024)
    # The workspace version this change made.
    version = models.BigIntegerField()
    blob = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    sha256 = models.CharField(max_length=64, blank=True, default="")
    size = models.BigIntegerField(default=0)
    deleted = models.BooleanField(default=False)
    changed_at = models.DateTimeField()
    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="file_versions")
    attempt = models.ForeignKey("Attempt", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    lock = models.ForeignKey(FileLock, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    fencing = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["project", "path", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["project", "path", "version"], name="file_version_unique"),
            models.CheckConstraint(condition=~Q(path="") & ~Q(path__startswith="/") & ~Q(path__endswith="/"),
                                   name="file_path_relative"),
            models.CheckConstraint(condition=Q(deleted=True, blob__isnull=True)
                                   | Q(deleted=False, blob__isnull=False), name="file_version_has_content"),
        ]
        indexes = [
            # A file's history, and the file as it was at a version: one index probe.
            models.Index(F("project"), F("path"), F("version").desc(), name="file_history"),
            # What one workspace version changed.
            models.Index(fields=["project", "version"], name="file_changes_by_version"),
            models.Index(fields=["step"], name="file_changes_by_step", condition=Q(step__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.path}@{self.version}"


class WorkspaceFile(models.Model):
    """Every path a project's workspace has ever had, as it is now (deleted or not): the latest tree in one
    indexed read, and the set of paths to look up the tree at an older version."""

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="workspace_files")
    path = models.CharField(max_length=1024)
    current = models.ForeignKey(FileVersion, on_delete=models.CASCADE, related_name="+")
    version = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, blank=True, default="")
    size = models.BigIntegerField(default=0)
    deleted = models.BooleanField(default=False)

    class Meta:
        ordering = ["project", "path"]
        constraints = [models.UniqueConstraint(fields=["project", "path"], name="workspace_file_unique_path")]
        indexes = [
            # The live tree under a prefix (`path LIKE 'src/%'`), whatever the database's collation.
            models.Index(fields=["project", "path"], name="workspace_tree_live", opclasses=["uuid_ops", "text_pattern_ops"],
                         condition=Q(deleted=False)),
        ]

    def __str__(self) -> str:
        return self.path

