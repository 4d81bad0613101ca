"""The worker side of AgentManager: the SDK (`Worker`, `Step`, `Result` and the exceptions a
handler raises), the /v1 client, and AM's own Reason+Act runtime built on them.

Imported lazily, so that the server (which has `agents` among its apps) loads none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agents.client import ApiError, Client, LockConflict, Unreachable
    from agents.errors import Cancelled, Failed, HandBack, LeaseLost, Retryable
    from agents.llm.base import Usage
    from agents.worker import Locks, Result, Step, Worker

_EXPORTS = {
    "Worker": "agents.worker", "Step": "agents.worker", "Result": "agents.worker", "Locks": "agents.worker",
    "Cancelled": "agents.errors", "Failed": "agents.errors", "HandBack": "agents.errors",
    "LeaseLost": "agents.errors", "Retryable": "agents.errors",
    "ApiError": "agents.client", "Client": "agents.client", "LockConflict": "agents.client",
    "Unreachable": "agents.client", "Usage": "agents.llm.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agents' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
