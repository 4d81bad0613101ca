from django.contrib import admin

from coordination import models


@admin.register(models.Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(models.Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "roles", "capacity", "can_submit", "enabled", "last_seen_at"]
    list_filter = ["enabled", "can_submit"]
    search_fields = ["name"]
    readonly_fields = ["token_prefix", "last_seen_at", "created_at"]


@admin.register(models.Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "status", "audit_status", "n_completed", "total_steps", "created_at"]
    list_filter = ["status", "audit_status", "project"]
    search_fields = ["name", "goal"]
    readonly_fields = [
        "total_steps", "n_pending", "n_ready", "n_in_progress", "n_completed", "n_failed",
        "n_cancelled", "n_skipped", "event_seq", "spent_usd", "spent_tokens", "created_at", "updated_at",
    ]


@admin.register(models.Step)
class StepAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "workflow", "role", "status", "attempt", "lease_agent", "lease_expires_at"]
    list_filter = ["status", "role"]
    search_fields = ["key", "name", "workflow__name"]
    raw_id_fields = ["workflow", "lease_agent"]
    readonly_fields = ["lease_token_hash", "remaining_deps", "created_at", "updated_at"]


@admin.register(models.Attempt)
class AttemptAdmin(admin.ModelAdmin):
    list_display = ["step", "number", "agent", "started_at", "ended_at", "outcome"]
    list_filter = ["outcome"]
    raw_id_fields = ["step", "agent"]
    readonly_fields = ["lease_token_hash"]


@admin.register(models.Result)
class ResultAdmin(admin.ModelAdmin):
    list_display = ["step", "status", "model", "prompt_tokens", "completion_tokens", "cost_usd", "created_at"]
    list_filter = ["status"]
    raw_id_fields = ["attempt", "step"]


@admin.register(models.AuditReport)
class AuditReportAdmin(admin.ModelAdmin):
    list_display = ["workflow", "round", "successful", "confidence", "reviewer", "created_at"]
    list_filter = ["successful"]
    raw_id_fields = ["workflow"]


@admin.register(models.FileLock)
class FileLockAdmin(admin.ModelAdmin):
    list_display = ["path", "project", "mode", "agent", "fencing", "expires_at", "released_at"]
    list_filter = ["mode", "project"]
    search_fields = ["path"]
    raw_id_fields = ["agent", "step"]
    readonly_fields = ["fencing"]


@admin.register(models.Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["at", "workflow", "seq", "kind", "step", "agent"]
    list_filter = ["kind"]
    raw_id_fields = ["workflow", "step", "agent"]


@admin.register(models.UserToken)
class UserTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "token_prefix", "created_at", "last_used_at"]
    readonly_fields = ["token_prefix"]
