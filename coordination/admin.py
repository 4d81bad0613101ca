"""The admin as an operations tool that cannot go around the services.

Every write an admin page can make is a service call (a form's save, a delete,
an action), so it is validated, recorded as an event and pushed live like any
other change. Rows that only the work creates (steps come with their workflow;
attempts, results, audits, locks and events come from work) have no add form,
and what cannot be deleted without leaving counters, locks or the log wrong
cannot be deleted here. A refusal is shown as a form error or a message, never
as a 500, and changes nothing.
"""

from functools import partial
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.actions import delete_selected
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import OperationalError
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.translation import gettext_lazy

from coordination import models
from coordination.errors import InvalidRequest, ServiceError
from coordination.services import (
    agent_registry,
    file_locks,
    lock_order,
    projects,
    step_edits,
    tokens,
    workflow_control,
)


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


def _adopt(obj, saved) -> None:
    """Give the admin's unsaved instance the row a service created, so the admin can log it and link to it."""
    for field in obj._meta.concrete_fields:
        setattr(obj, field.attname, getattr(saved, field.attname))
    obj._state.adding = False
    obj._state.db = saved._state.db


@admin.action(permissions=["delete"], description=gettext_lazy("Delete selected %(verbose_name_plural)s"))
def delete_selected_through_services(modeladmin, request, queryset):
    """Django's bulk delete and its confirmation page, then each row deleted by its service on its own.

    One transaction per row keeps the lock order of the service, and a row the
    service refuses (a live workflow) is reported without undoing the others.
    """
    _, _, perms_needed, protected = modeladmin.get_deleted_objects(queryset, request)
    if not request.POST.get("post") or perms_needed or protected:
        return delete_selected(modeladmin, request, queryset)

    def delete(obj) -> None:
        modeladmin.delete_model(request, obj)
        modeladmin.log_deletions(request, [obj])

    _each(modeladmin, request, queryset, delete, "Deleted")
    return None


class ServiceAdmin(admin.ModelAdmin):
    """A model admin that writes only through services; by default it adds, changes and deletes nothing.

    A subclass opens a permission (`allows_add`, `allows_change`, `allows_delete`)
    and overrides `save_model` or `delete_model` with the service call. The
    defaults refuse, so Django's own `obj.save()` and `obj.delete()` are never
    reached, whatever is posted.
    """

    allows_add = False
    allows_change = False
    allows_delete = False

    def has_add_permission(self, request):
        return self.allows_add and super().has_add_permission(request)

    def has_change_permission(self, request, obj=None):
        return self.allows_change and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self.allows_delete and super().has_delete_permission(request, obj)

    def save_model(self, request, obj, form, change):
        raise PermissionDenied

    def save_related(self, request, form, formsets, change):
        """Nothing more to save: inlines are read-only and service forms have no many-to-many fields."""

    def construct_change_message(self, request, form, formsets, add=False):
        return super().construct_change_message(request, form, [], add)  # read-only inlines changed nothing

    def delete_model(self, request, obj):
        raise PermissionDenied

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            actions["delete_selected"] = (delete_selected_through_services, "delete_selected",
                                          actions["delete_selected"][2])
        return actions

    def _refusable(self, request, view, url_if_refused: str):
        """Run an admin view whose writes are service calls; a refusal becomes a message and changes nothing.

        The admin's transaction is rolled back on the way out. A conflict PostgreSQL
        rolled back counts as a refusal too: inside the admin's transaction the
        service cannot run itself again.
        """
        try:
            return view()
        except ServiceError as exc:
            detail = exc.detail
        except OperationalError as exc:
            reason = lock_order.conflict_reason(exc)
            if reason is None:
                raise
            detail = f"The server was busy ({reason}); nothing was changed. Send it again."
        self.message_user(request, detail, messages.ERROR)
        return HttpResponseRedirect(url_if_refused)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        view = partial(super().changeform_view, request, object_id, form_url, extra_context)
        return self._refusable(request, view, request.get_full_path())

    def delete_view(self, request, object_id, extra_context=None):
        view = partial(super().delete_view, request, object_id, extra_context)
        change_url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[object_id],
                             current_app=self.admin_site.name)
        return self._refusable(request, view, change_url)

    def response_action(self, request, queryset):
        # A selection that names no possible row (not a UUID) would fail in the queryset's filter.
        for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
            try:
                self.opts.pk.to_python(value)
            except ValidationError:
                self.message_user(request, f"{value[:50]!r} is not a {self.opts.verbose_name} id.", messages.ERROR)
                return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset)


class ReadOnlyInline(admin.TabularInline):
    """Rows shown with their parent (its `fields`), changed only by the work: no add, change or delete here."""

    extra = 0
    can_delete = False
    show_change_link = True

    def get_readonly_fields(self, request, obj=None):
        return list(self.fields)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(models.Project)
class ProjectAdmin(ServiceAdmin):
    """Created and described here (`projects`); a project is never deleted (its name is its lock namespace)."""

    list_display = ["name", "description", "created_at"]
    search_fields = ["name"]
    fields = ["name", "description", "created_at"]
    allows_add = True
    allows_change = True

    def get_readonly_fields(self, request, obj=None):
        return ["name", "created_at"] if obj is not None else ["created_at"]

    def save_model(self, request, obj, form, change):
        description = form.cleaned_data.get("description", "")
        if change:
            projects.project_update(project_id=obj.pk, description=description, user=request.user)
        else:
            _adopt(obj, projects.project_create(name=form.cleaned_data["name"], description=description,
                                                user=request.user))


class AgentForm(forms.ModelForm):
    def clean_roles(self):
        try:
            return agent_registry.parse_roles(self.cleaned_data["roles"])
        except InvalidRequest as exc:
            raise ValidationError(exc.detail) from None


@admin.register(models.Agent)
class AgentAdmin(ServiceAdmin):
    """Edited through `agent_update`. Agents are created with `manage.py create_agent`, which shows the token once,
    and disabled rather than deleted (a deleted agent would leave its running steps without a lease holder)."""

    form = AgentForm
    list_display = ["name", "roles", "capacity", "can_submit", "enabled", "last_seen_at", "token_prefix"]
    list_filter = ["enabled", "can_submit"]
    search_fields = ["name"]
    readonly_fields = ["token_prefix", "last_seen_at", "created_at"]
    fields = ["name", "roles", "capacity", "can_submit", "enabled", "token_prefix", "last_seen_at", "created_at"]
    actions = ["disable_agents", "enable_agents"]
    allows_change = True

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        agent_registry.agent_update(agent_id=obj.pk, name=data["name"], roles=data["roles"],
                                    capacity=data["capacity"], can_submit=data["can_submit"],
                                    enabled=data["enabled"], user=request.user)

    @admin.action(description="Disable selected agents (their tokens stop working)")
    def disable_agents(self, request, queryset):
        _each(self, request, queryset, lambda a: agent_registry.agent_set_enabled(agent_id=a.id, enabled=False,
                                                                                  user=request.user), "Disabled")

    @admin.action(description="Enable selected agents")
    def enable_agents(self, request, queryset):
        _each(self, request, queryset, lambda a: agent_registry.agent_set_enabled(agent_id=a.id, enabled=True,
                                                                                  user=request.user), "Enabled")


class StepInline(ReadOnlyInline):
    model = models.Step
    fields = ["key", "name", "role", "status", "attempt", "max_attempts", "lease_agent", "lease_expires_at"]


WORKFLOW_EDITABLE_FIELDS = ["name", "priority", "budget_usd", "budget_tokens", "max_rework_rounds"]


@admin.register(models.Workflow)
class WorkflowAdmin(ServiceAdmin):
    """Edited through `workflow_edit`, deleted (once finished) through `workflow_delete`.

    Workflows are submitted (API, dashboard, planner) with their steps, so there is no add form.
    """

    list_display = ["name", "project", "status", "audit_status", "n_completed", "total_steps", "spent_tokens",
                    "created_at"]
    list_filter = ["status", "audit_status", "project"]
    search_fields = ["name", "goal"]
    readonly_fields = [
        "project", "goal", "status", "audit_status", "paused_reason", "failure_reason", "max_attempts",
        "total_steps", "n_pending", "n_ready", "n_in_progress", "n_completed", "n_failed", "n_cancelled",
        "n_skipped", "spent_usd", "spent_tokens", "rework_round", "synthesis", "metadata",
        "created_by_user", "created_by_agent", "created_at", "updated_at", "finished_at",
    ]
    fields = WORKFLOW_EDITABLE_FIELDS + readonly_fields
    inlines = [StepInline]
    actions = ["cancel_workflows", "pause_workflows", "resume_workflows"]
    allows_change = True
    allows_delete = True

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        workflow_control.workflow_edit(workflow_id=obj.pk, name=data["name"], priority=data["priority"],
                                       budget_usd=data["budget_usd"], budget_tokens=data["budget_tokens"],
                                       max_rework_rounds=data["max_rework_rounds"], user=request.user)

    def delete_model(self, request, obj):
        workflow_control.workflow_delete(workflow_id=obj.pk, user=request.user)

    def get_deleted_objects(self, objs, request):
        # The steps, attempts, results, audits and events go with their workflow in the service:
        # their own admins refusing deletion does not stand in its way.
        to_delete, model_count, _, protected = super().get_deleted_objects(objs, request)
        return to_delete, model_count, set(), protected

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


class AttemptInline(ReadOnlyInline):
    model = models.Attempt
    fields = ["number", "agent", "started_at", "expires_at", "ended_at", "outcome"]
    show_change_link = False


class StepEditForm(forms.ModelForm):
    """The descriptive fields of a step, checked by the service's own validation, field by field."""

    def clean(self):
        cleaned = super().clean()
        for field, value in self.edits().items():
            try:
                cleaned[field] = step_edits.step_edit_validate(changes={field: value})[field]
            except InvalidRequest as exc:
                self.add_error(field, exc.detail)
        return cleaned

    def edits(self) -> dict[str, Any]:
        """The fields the person changed (and that are valid so far)."""
        return {field: self.cleaned_data[field] for field in self.changed_data
                if field in step_edits.EDITABLE_FIELDS and field in self.cleaned_data}


@admin.register(models.Step)
class StepAdmin(ServiceAdmin):
    """What a step is asked to do is edited through `step_edit` (recorded as `step.edited`, pushed live);
    what it is doing changes only through the work. Steps come with their workflow and go with it."""

    form = StepEditForm
    list_display = ["key", "name", "workflow", "role", "status", "attempt", "lease_agent", "lease_expires_at"]
    list_filter = ["status", "role"]
    search_fields = ["key", "name", "workflow__name"]
    readonly_fields = ["workflow", "key", "role", "status", "attempt", "attempts_released", "lease_agent",
                       "lease_expires_at", "remaining_deps", "available_at", "workflow_priority", "extra_inputs",
                       "final_result", "outputs", "error", "created_at", "updated_at", "started_at", "finished_at"]
    fields = list(step_edits.EDITABLE_FIELDS) + readonly_fields
    inlines = [AttemptInline]
    actions = ["retry_steps"]
    allows_change = True

    def save_model(self, request, obj, form, change):
        step_edits.step_edit(step_id=obj.pk, changes=form.edits(), user=request.user)

    @admin.action(description="Retry selected failed or cancelled steps")
    def retry_steps(self, request, queryset):
        _each(self, request, queryset, lambda s: workflow_control.step_retry(step_id=s.id, user=request.user), "Retried")


@admin.register(models.Attempt)
class AttemptAdmin(ServiceAdmin):
    list_display = ["step", "number", "agent", "started_at", "ended_at", "outcome"]
    list_filter = ["outcome"]


@admin.register(models.Result)
class ResultAdmin(ServiceAdmin):
    list_display = ["step", "status", "model", "prompt_tokens", "completion_tokens", "cost_usd", "created_at"]
    list_filter = ["status", "model"]


@admin.register(models.AuditReport)
class AuditReportAdmin(ServiceAdmin):
    list_display = ["workflow", "round", "successful", "confidence", "reviewer", "created_at"]
    list_filter = ["successful"]


@admin.register(models.FileLock)
class FileLockAdmin(ServiceAdmin):
    """Granted and released by the work; staff may force a release (an action, through `lock_release`)."""

    list_display = ["path", "project", "mode", "agent", "step", "fencing", "acquired_at", "expires_at", "released_at",
                    "release_reason"]
    list_filter = ["mode", "project", "release_reason"]
    search_fields = ["path", "agent__name"]
    actions = ["release_locks"]

    @admin.action(description="Release selected locks")
    def release_locks(self, request, queryset):
        _each(self, request, queryset, lambda lock: file_locks.lock_release(lock_id=lock.id, user=request.user),
              "Released")


@admin.register(models.Event)
class EventAdmin(ServiceAdmin):
    """The log is append-only: it is read here, never written."""

    list_display = ["at", "workflow", "seq", "kind", "step", "agent"]
    list_filter = ["kind"]
    search_fields = ["kind"]


@admin.register(models.UserToken)
class UserTokenAdmin(ServiceAdmin):
    """People's API tokens: made by `tokens.user_token_create` (shown once), revoked here (`user_token_revoke`)."""

    list_display = ["user", "name", "token_prefix", "created_at", "last_used_at"]
    fields = ["user", "name", "token_prefix", "created_at", "last_used_at"]
    allows_delete = True

    def delete_model(self, request, obj):
        tokens.user_token_revoke(token_id=obj.pk, user=request.user)
