"""What a step handler raises to say how its step ended, and what the SDK raises into a handler.

A handler raises:
- `Retryable`: failed this time; the server retries the step after a backoff while attempts remain.
- `Failed`: failed for good; no retry, whatever attempts remain.
- `HandBack`: not this worker's to do now; the step goes back to `ready` without charging an attempt.
Any other exception fails the step for good, with its traceback as the step's `error`.

The SDK raises into a handler, at its next SDK call (`step.log`, `step.write`, `step.lock`,
`step.sleep`, `step.check`...), once its step must stop:
- `Cancelled`: the workflow was cancelled or paused, or the worker is shutting down.
- `LeaseLost` (a `Cancelled`): the lease is no longer this worker's; another agent may hold the step.
"""

from __future__ import annotations


class Cancelled(Exception):
    """The step must stop: nothing the handler does from now on is reported."""

    def __init__(self, reason: str = "the step was cancelled") -> None:
        super().__init__(reason)
        self.reason = reason


class LeaseLost(Cancelled):
    """The server says the lease is gone: drop the work (another agent may be doing it)."""

    def __init__(self, reason: str = "the lease was lost") -> None:
        super().__init__(reason)


class Retryable(Exception):
    """Raised by a handler: this attempt failed, another may succeed (the server retries after a backoff)."""


class Failed(Exception):
    """Raised by a handler: the step failed and must not be retried."""


class HandBack(Exception):
    """Raised by a handler: give the step back without charging an attempt (another agent, or later)."""
