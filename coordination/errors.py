"""Errors raised by services, carried to clients as `{"error", "detail", ...}`.

Each has the HTTP status an API view answers with, so every caller (REST, MCP,
dashboard) reports the same failure the same way.
"""

from typing import Any


class ServiceError(Exception):
    code = "error"
    status = 400

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class InvalidWorkflow(ServiceError):
    code = "invalid_workflow"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0]["detail"] if errors else "The workflow is invalid."
        more = f" ({len(errors) - 1} more problem(s) in `errors`)" if len(errors) > 1 else ""
        super().__init__(f"{first}{more}", errors=errors)
        self.errors = errors


class InvalidPath(ServiceError):
    code = "invalid_path"


class InvalidRequest(ServiceError):
    code = "invalid_request"


class NotFound(ServiceError):
    code = "not_found"
    status = 404


class Forbidden(ServiceError):
    code = "forbidden"
    status = 403


class Conflict(ServiceError):
    code = "conflict"
    status = 409


class StaleLease(Conflict):
    code = "stale_lease"


class InvalidState(Conflict):
    code = "invalid_state"


class AtCapacity(ServiceError):
    code = "at_capacity"
    status = 429


class LockConflict(Conflict):
    code = "lock_conflict"


class Busy(ServiceError):
    """PostgreSQL refused the change because of concurrent ones, more times than the server retries."""

    code = "busy"
    status = 503


class LockRequired(Conflict):
    """A workspace write without a write lock of the writer covering the path (or with a read lock's number)."""

    code = "lock_required"


class StaleFencing(Conflict):
    """A workspace write whose lock expired, was released or was granted to someone else since."""

    code = "stale_fencing"


class PreconditionFailed(ServiceError):
    code = "precondition_failed"
    status = 412


class TooLarge(ServiceError):
    code = "too_large"
    status = 413

