"""A person editing a step's descriptive fields (the admin): validated, recorded as `step.edited`, pushed live.

What a step is doing (status, lease, attempts used, results) changes only
through the work itself; what it is asked to do may be edited: its name,
description, priority, attempts allowed, lease length, and its declared files
while it is not running (a running step holds locks on them).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from coordination.errors import InvalidPath, InvalidRequest, InvalidState
from coordination.models import LockMode, StepStatus
from coordination.paths import normalise_path
from coordination.services import event_log, lock_order
from coordination.services.workflow_counters import actor

MAX_NAME = 200
MAX_DESCRIPTION = 1_000_000
PRIORITY_MAX = 1_000_000
MAX_ATTEMPTS = 100
MIN_LEASE_TTL_S = 5
MAX_FILES = 200
EDITABLE_FIELDS = ("name", "description", "priority", "max_attempts", "lease_ttl_s", "files")


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name}={value!r} must be a whole number from {low} to {high}.")
    return value


def _files(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or len(raw) > MAX_FILES:
        raise InvalidRequest(f"`files` is a list of at most {MAX_FILES} {{\"path\", \"mode\"}} objects.")
    files: dict[str, str] = {}
    for item in raw:
        if not isinstance(item, dict) or set(item) - {"path", "mode"} or "path" not in item:
            raise InvalidRequest('Each declared file is {"path": "...", "mode": "read" or "write"}.')
        mode = item.get("mode", LockMode.WRITE)
        if mode not in LockMode.values:
            raise InvalidRequest(f"File mode {mode!r} is not 'read' or 'write'.")
        try:
            path = normalise_path(item["path"])
        except InvalidPath as exc:
            raise InvalidRequest(exc.detail) from None
        if files.get(path) != LockMode.WRITE:
            files[path] = mode
    return [{"path": path, "mode": mode} for path, mode in files.items()]


def step_edit_validate(*, changes: dict[str, Any]) -> dict[str, Any]:
    """The edit, checked and normalised; `InvalidRequest` names the first bad field."""
    unknown = set(changes) - set(EDITABLE_FIELDS)
    if unknown:
        raise InvalidRequest(f"Only {', '.join(EDITABLE_FIELDS)} of a step may be edited, not {', '.join(sorted(unknown))}.")
    clean: dict[str, Any] = {}
    if "name" in changes:
        name = changes["name"].strip() if isinstance(changes["name"], str) else ""
        if not name or len(name) > MAX_NAME:
            raise InvalidRequest(f"A step name must be 1 to {MAX_NAME} characters.")
        clean["name"] = name
    if "description" in changes:
        description = changes["description"]
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION or "\x00" in description:
            raise InvalidRequest(f"A description is text of at most {MAX_DESCRIPTION} characters, without NUL.")
        clean["description"] = description
    if "priority" in changes:
        clean["priority"] = _whole("priority", changes["priority"], -PRIORITY_MAX, PRIORITY_MAX)
    if "max_attempts" in changes:
        clean["max_attempts"] = _whole("max_attempts", changes["max_attempts"], 1, MAX_ATTEMPTS)
    if "lease_ttl_s" in changes:
        clean["lease_ttl_s"] = _whole("lease_ttl_s", changes["lease_ttl_s"], MIN_LEASE_TTL_S,
                                      settings.AM_MAX_LEASE_TTL_S)
    if "files" in changes:
        clean["files"] = _files(changes["files"])
    return clean


@lock_order.retrying
def step_edit(*, step_id: UUID, changes: dict[str, Any], user: AbstractBaseUser | None = None):
    """Apply an edit of a step's descriptive fields; unchanged values are ignored.

    A new `max_attempts` counts from the attempts already used; a new
    `lease_ttl_s` applies from the next heartbeat or lease.
    """
    clean = step_edit_validate(changes=changes)
    step = lock_order.lock_step_for_edit(step_id)
    changed = {field: value for field, value in clean.items() if getattr(step, field) != value}
    if not changed:
        return step
    if "files" in changed and step.status == StepStatus.IN_PROGRESS:
        raise InvalidState(f"Step {step.key!r} is running and holds locks on its declared files; "
                           "edit them once it has finished or been handed back.")
    for field, value in changed.items():
        setattr(step, field, value)
    step.save(update_fields=[*changed, "updated_at"])
    shown = {field: (value if field != "description" else f"{len(value)} characters") for field, value in changed.items()}
    event_log.event_record(kind="step.edited", workflow_id=step.workflow_id, step_id=step.id,
                           data={"step": step.key, "changed": shown, **actor(user, None)})
    return step
