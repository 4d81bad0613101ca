"""The admin as an operations tool. Every action calls a service, so it is recorded and pushed like any change."""

from django.contrib import admin, messages

from coordination import models
from coordination.services import agent_registry, file_locks, workflow_control
from coordination.errors import ServiceError


def _each(modeladmin, request, queryset, fn, done: str) -> None:
    ok, failed = 0, []
    for obj in queryset:
        try:
            fn(obj)
            ok += 1
        except ServiceError as exc:
            failed.append(f"{obj}: {exc.detail}")
    if ok:
        modeladmin.message_user(request, f"{done}: {ok}.", messages.SUCCESS)
    for failure in failed:
        modeladmin.message_user(request, failure, messages.WARNING)


@admin.register(models.Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "description", "created_at"]
    search_fields = ["name"]


@admin.register(models.Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "roles", "capacity", "can_submit", "enabled", "last_seen_at", "token_prefix"]
    list_filter = ["enabled", "can_submit"]
    search_fields = ["name"]
    readonly_fields = ["token_prefix", "last_seen_at", "created_at"]
    fields = ["name", "roles", "capacity", "can_submit", "enabled", "token_prefix", "last_seen_at", "created_at"]
    actions = ["disable_agents", "enable_agents"]

    def has_add_permission(self, request):
        # Tokens are created with `manage.py create_agent`, which shows the token once.
        return False

    @admin.action(description="Disable selected agents (their tokens stop working)")
    def disable_agents(self, request, queryset):
        _each(self, request, queryset, lambda a: agent_registry.agent_set_enabled(agent_id=a.id, enabled=False,
                                                                            user=request.user), "Disabled")

    @admin.action(description="Enable selected agents")
    def enable_agents(self, request, queryset):
        _each(self, request, queryset, lambda a: agent_registry.agent_set_enabled(agent_id=a.id, enabled=True,
                                                                            user=request.user), "Enabled")


class StepInline(admin.TabularInline):
    model = models.Step
    fields = ["key", "name", "role", "status", "attempt", "max_attempts", "lease_agent", "lease_expires_at"]
    readonly_fields = ["key", "status", "attempt", "lease_agent", "lease_expires_at"]
    extra = 0
    show_change_link = True
    can_delete = False
    max_num = 0


@admin.register(models.Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "status", "audit_status", "n_completed", "total_steps", "spent_tokens",
                    "created_at"]
    list_filter = ["status", "audit_status", "project"]
    search_fields = ["name", "goal"]
    readonly_fields = [
        "status", "audit_status", "paused_reason", "failure_reason", "total_steps", "n_pending", "n_ready",
        "n_in_progress", "n_completed", "n_failed", "n_cancelled", "n_skipped", "event_seq", "spent_usd",
        "spent_tokens", "rework_round", "synthesis", "created_at", "updated_at", "finished_at",
    ]
    inlines = [StepInline]
    actions = ["cancel_workflows", "pause_workflows", "resume_workflows"]

    @admin.action(description="Cancel selected workflows")
    def cancel_workflows(self, request, queryset):
        _each(self, request, queryset, lambda w: workflow_control.workflow_cancel(workflow_id=w.id, user=request.user),
              "Cancelled")

    @admin.action(description="Pause selected workflows")
    def pause_workflows(self, request, queryset):
        _each(self, request, queryset, lambda w: workflow_control.workflow_pause(workflow_id=w.id, user=request.user),
              "Paused")

    @admin.action(description="Resume selected workflows")
    def resume_workflows(self, request, queryset):
        _each(self, request, queryset, lambda w: workflow_control.workflow_resume(workflow_id=w.id, user=request.user),
              "Resumed")


class AttemptInline(admin.TabularInline):
    model = models.Attempt
    fields = ["number", "agent", "started_at", "expires_at", "ended_at", "outcome"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0


@admin.register(models.Step)
class StepAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "workflow", "role", "status", "attempt", "lease_agent", "lease_expires_at"]
    list_filter = ["status", "role"]
    search_fields = ["key", "name", "workflow__name"]
    raw_id_fields = ["workflow", "lease_agent"]
    # Status, leases and counters change only through services; descriptive fields may be edited here.
    readonly_fields = ["workflow", "key", "role", "status", "attempt", "attempts_released", "lease_agent",
                       "lease_token_hash", "lease_expires_at", "remaining_deps", "available_at", "final_result",
                       "outputs", "error", "created_at", "updated_at", "started_at", "finished_at"]
    inlines = [AttemptInline]
    actions = ["retry_steps"]

    @admin.action(description="Retry selected failed or cancelled steps")
    def retry_steps(self, request, queryset):
        _each(self, request, queryset, lambda s: workflow_control.step_retry(step_id=s.id, user=request.user), "Retried")


@admin.register(models.Attempt)
class AttemptAdmin(admin.ModelAdmin):
    list_display = ["step", "number", "agent", "started_at", "ended_at", "outcome"]
    list_filter = ["outcome"]
    raw_id_fields = ["step", "agent"]
    readonly_fields = ["step", "agent", "number", "lease_token_hash", "idempotency_key", "started_at", "expires_at",
                       "ended_at", "outcome"]


@admin.register(models.Result)
class ResultAdmin(admin.ModelAdmin):
    list_display = ["step", "status", "model", "prompt_tokens", "completion_tokens", "cost_usd", "created_at"]
    list_filter = ["status", "model"]
    raw_id_fields = ["attempt", "step"]


@admin.register(models.AuditReport)
class AuditReportAdmin(admin.ModelAdmin):
    list_display = ["workflow", "round", "successful", "confidence", "reviewer", "created_at"]
    list_filter = ["successful"]
    raw_id_fields = ["workflow"]


@admin.register(models.FileLock)
class FileLockAdmin(admin.ModelAdmin):
    list_display = ["path", "project", "mode", "agent", "step", "fencing", "acquired_at", "expires_at", "released_at",
                    "release_reason"]
    list_filter = ["mode", "project", "release_reason"]
    search_fields = ["path", "agent__name"]
    raw_id_fields = ["agent", "step"]
    readonly_fields = ["project", "path", "mode", "agent", "step", "fencing", "acquired_at", "expires_at",
                       "released_at", "release_reason"]
    actions = ["release_locks"]

    @admin.action(description="Release selected locks")
    def release_locks(self, request, queryset):
        _each(self, request, queryset, lambda lock: file_locks.lock_release(lock_id=lock.id, user=request.user),
              "Released")


@admin.register(models.Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["at", "workflow", "seq", "kind", "step", "agent"]
    list_filter = ["kind"]
    search_fields = ["kind"]
    raw_id_fields = ["workflow", "step", "agent"]

    def has_change_permission(self, request, obj=None):
        return False  # the log is append-only


@admin.register(models.UserToken)
class UserTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "token_prefix", "created_at", "last_used_at"]
    readonly_fields = ["token_prefix", "created_at", "last_used_at"]
    fields = ["user", "name", "token_prefix", "created_at", "last_used_at"]

    def has_add_permission(self, request):
        return False
