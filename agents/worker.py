"""The worker SDK: bring your own agent. Register a function for some roles; the SDK speaks the protocol.

```python
from agents import Worker

worker = Worker(server="http://am:8001", token=TOKEN, workspace="~/am-mirrors")

@worker.step("developer", "tester")
def work(step):
    step.log(thought="plan", action="read spec", observation="...")
    with step.lock("src/app.py"):
        step.write("src/app.py", code)
    return "done"          # or a dict of outputs, or Result(...); raise Retryable / Failed / HandBack

worker.run(concurrency=4)
```

What the SDK does around each handler call (the same for AM's own ReAct runtime, which is
one handler among others: agents/runtime.py):
1. A poller long-polls `GET /v1/tasks/{roles}/ready`, asking for as many steps as slots are
   free (`?max=N`; one at a time from a server that does not take it), with an Idempotency-Key.
2. Each leased step runs in a slot thread: `_execute(lease)` calls the handler (an `async def`
   one on an event loop of its own). A heartbeat thread keeps the lease and the step's locks
   alive every third of the lease's TTL and streams each `step.log` at once.
3. A heartbeat's `cancel: true` or `409 stale_lease` sets `step.cancelled`; the handler's next
   SDK call raises `Cancelled` (`LeaseLost`), an async handler's task is cancelled, and nothing
   it does afterwards is reported: a cancelled step is handed back, a lost one dropped.
4. The handler's answer is reported with the iterations, usage and execution time, retried
   with backoff until the server takes it; a worker that must stop first spools it to disk and
   delivers it when it starts again.
On SIGTERM/SIGINT (or `stop()`) no new step is pulled; running steps have `shutdown_grace_s` to
finish, then they are told to stop and handed back (a second signal: at once). A handler that
ignores the SDK is abandoned a few seconds later: its lease is handed back for it, its result
dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import os
import posixpath
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import telemetry
from agents.client import ApiError, Client, Pulled, Unreachable
from agents.errors import Cancelled, Failed, HandBack, LeaseLost, Retryable
from agents.llm.base import Usage
from agents.mirror import STATE_DIR, Mirror
from agents.tools import covers

logger = logging.getLogger("agents")

Handler = Callable[["Step"], Any]

# Once running steps were told to stop, how long they have to hand back by themselves before the
# worker hands their leases back for them and stops waiting.
ABANDON_AFTER_S = 5.0
# The most iterations one heartbeat carries (the server takes up to 1,000).
HEARTBEAT_BATCH = 500
# How long a poller that was told `429 at_capacity` waits before it asks again (sooner when a slot frees).
AT_CAPACITY_WAIT_S = 2.0


@dataclass
class Result:
    """What a handler may return: its result for the next steps, named outputs, and what it spent."""

    final_result: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    usage: Usage | dict[str, Any] | None = None


@dataclass
class Outcome:
    """How an attempt ended, as reported: `completed`, or `failed` (retryable or not)."""

    status: str
    final_result: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    retryable: bool = False


def _relative(path: str) -> str:
    """A workspace path as the server names it: relative, POSIX, normalised; ValueError otherwise."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise ValueError(f"{path!r} is not a workspace path: give a relative path such as 'src/app.py'.")
    normalised = posixpath.normpath(path.replace("\\", "/"))
    if path.startswith("/") or normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise ValueError(f"{path!r} is not inside the workspace: give a relative path such as 'src/app.py'.")
    if normalised == STATE_DIR or normalised.startswith(STATE_DIR + "/"):
        raise ValueError(f"{path!r} is the mirror's own bookkeeping, not a file of the project.")
    return normalised


class Locks:
    """Locks a step took with `step.lock(...)`: held until `release()` (or the `with` block ends), or
    until the step ends, when the server releases them with its lease."""

    def __init__(self, step: Step, granted: list[dict[str, Any]]) -> None:
        self.step = step
        self.granted = granted

    @property
    def fencing(self) -> dict[str, int]:
        """path -> fencing number of each lock granted."""
        return {lock["path"]: lock["fencing"] for lock in self.granted}

    def release(self) -> None:
        for lock in self.granted:
            self.step._forget_lock(lock)
            if not self.step._ended.is_set():
                self.step._client.unlock(lock["id"])
        self.granted = []

    def __enter__(self) -> Locks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.release()
        except (ApiError, Unreachable) as exc:
            # The lock ends with the step's lease anyway; do not hide the exception of the block.
            logger.warning("Could not release the locks of %s: %s", self.step.label, exc)


class Step:
    """One leased step, as its handler sees it.

    Read: `id`, `key`, `name`, `description`, `role`, `attempt`, `inputs` (the results of the steps it
    depends on), `files` (declared paths and modes), `workflow` (`id`, `name`, `project`), `project`,
    `data` (the step as the server sent it). `cancelled` turns true when the step must stop.
    """

    def __init__(self, worker: Worker, lease: Pulled) -> None:
        self._worker = worker
        self._client = worker.client
        self.lease = lease
        self.data: dict[str, Any] = lease.step
        self.id: str = lease.step["id"]
        self.key: str = lease.step.get("key", "")
        self.name: str = lease.step.get("name", "")
        self.role: str = lease.step.get("role", "")
        self.description: str = lease.step.get("description", "")
        self.attempt: int = lease.step.get("attempt", 1)
        self.inputs: dict[str, Any] = lease.step.get("inputs") or {}
        self.files: list[dict[str, Any]] = lease.step.get("files") or []
        self.workflow: dict[str, Any] = lease.workflow
        self.project: str = lease.workflow.get("project") or "default"
        self.usage = Usage()
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.cancel_reason = ""
        self._pending: list[dict[str, Any]] = []
        self._guard = threading.Lock()
        self._new_iteration = threading.Event()
        self._stop = threading.Event()
        self._ended = threading.Event()
        self._lost = False
        self._cancelled_by_server = False
        self._on_interrupt: list[Callable[[], None]] = []
        self._phase = "running"  # -> "finishing" (its thread reports it) | "abandoned" (the worker handed it back)
        self._locks = [lock for lock in lease.lease.get("locks", []) if lock.get("mode", "write") == "write"]
        self._mirror: Mirror | None = None

    @property
    def token(self) -> str:
        return self.lease.token

    @property
    def label(self) -> str:
        return f"{self.workflow.get('name', '')} / {self.key} ({self.role})"

    # --- stopping -----------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the step must stop: the workflow was cancelled or paused, the lease was lost,
        or the worker is shutting down. `cancel_reason` says which."""
        return self._stop.is_set()

    @property
    def lease_lost(self) -> bool:
        return self._lost

    def check(self) -> None:
        """Raise `Cancelled` (`LeaseLost`) if the step must stop; every SDK call does this first."""
        if self._stop.is_set():
            raise LeaseLost(self.cancel_reason) if self._lost else Cancelled(self.cancel_reason)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once (with `Cancelled`) if the step must stop meanwhile."""
        self.check()
        if self._stop.wait(seconds):
            self.check()

    def _interrupt(self, reason: str, *, lost: bool = False, by_server: bool = False) -> None:
        with self._guard:
            if self._stop.is_set():
                return
            self.cancel_reason = reason
            self._lost = lost
            self._cancelled_by_server = by_server
            self._stop.set()
            callbacks, self._on_interrupt = self._on_interrupt, []
        for callback in callbacks:
            callback()

    def _when_interrupted(self, callback: Callable[[], None]) -> None:
        with self._guard:
            if not self._stop.is_set():
                self._on_interrupt.append(callback)
                return
        callback()

    def _settle(self, phase: str) -> bool:
        """Move on from `running` to `phase`; False if the other side (the handler's thread, or the
        worker handing the step back) got there first."""
        with self._guard:
            if self._phase != "running":
                return False
            self._phase = phase
            return True

    # --- reasoning and usage -------------------------------------------------------------

    def log(self, thought: str = "", action: str = "", observation: str = "", *,
            iteration: int | None = None) -> None:
        """Record one reasoning step; it is sent with the next heartbeat, at once, and shown live."""
        self.check()
        with self._guard:
            number = iteration if iteration is not None else len(self.history) + 1
            entry = {"iteration": int(number), "thought": str(thought), "action": str(action),
                     "observation": str(observation)}
            self.history.append(entry)
            self._pending.append(entry)
        self._new_iteration.set()
        if self._worker.verbose:
            logger.info("   %s #%d thought: %s", self.key, entry["iteration"], entry["thought"])
            logger.info("   %s #%d action:  %s", self.key, entry["iteration"], entry["action"])

    def add_usage(self, usage: Usage | dict[str, Any] | None = None, **fields: Any) -> None:
        """Count what the step spent: a `Usage`, or `model`, `prompt_tokens`, `completion_tokens`, `cost_usd`."""
        if usage is None:
            usage = fields
        if isinstance(usage, dict):
            from decimal import Decimal

            usage = Usage(model=str(usage.get("model") or ""), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          cost_usd=Decimal(str(usage.get("cost_usd") or 0)))
        with self._guard:
            self.usage.add(usage)

    # --- the workspace ----------------------------------------------------------------------

    @property
    def mirror(self) -> Mirror:
        """The project's local mirror, brought up to date from the server on first use in this step."""
        self.check()
        with self._guard:
            mirror = self._mirror
        if mirror is None:
            mirror = Mirror(self._worker.workspace, self.project, self._client)
            mirror.sync()
            with self._guard:
                self._mirror = mirror
        return mirror

    @property
    def workspace(self) -> Path:
        """The directory holding the project's files (the synced mirror): read it freely; change
        files only through `write` and `delete`, which go to the server first."""
        return self.mirror.root

    def read(self, path: str) -> str:
        """A file's text as the server holds it now (so a read under a lock sees the latest write)."""
        return self.read_bytes(path).decode("utf-8")

    def read_bytes(self, path: str) -> bytes:
        """A file's bytes as the server holds it now, refreshed into the mirror; FileNotFoundError when
        the project has no such file."""
        relative = _relative(path)
        mirror = self.mirror
        with mirror.guard():
            mirror.refresh([relative])
            return (mirror.root / relative).read_bytes()

    def exists(self, path: str) -> bool:
        """Whether the project's workspace has this file now."""
        try:
            self.read_bytes(path)
        except FileNotFoundError:
            return False
        return True

    def lock(self, *paths: str, mode: str = "write", wait_s: float | None = None) -> Locks:
        """Lock `paths` (a path ending in `/`: a directory) under the step's lease, all or none,
        waiting up to `wait_s` for other holders. Usable as `with step.lock(...):`, which releases
        them at the end of the block; otherwise they last until the step ends.
        Raises `LockConflict` (with `.conflicts`) when another holder keeps one."""
        wanted = [path if path.endswith("/") else _relative(path) for path in paths]
        return Locks(self, self._acquire(wanted, mode, self._worker.lock_wait_s if wait_s is None else wait_s))

    def write(self, path: str, content: str | bytes) -> dict[str, Any]:
        """Write a file of the project's workspace, fenced: under a write lock the step holds (one is
        taken under the lease first if none covers the path). The server takes it, then the mirror.
        Returns the server's answer (`path`, `sha256`, `size`, `version`)."""
        relative = _relative(path)
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        mirror = self.mirror
        fencing = self._fencing(relative)
        try:
            return mirror.write(relative, data, fencing=fencing)
        except ApiError as exc:
            self._refused(exc, relative)
            raise

    def delete(self, path: str) -> dict[str, Any]:
        """Delete a file of the project's workspace, fenced like `write`."""
        relative = _relative(path)
        mirror = self.mirror
        fencing = self._fencing(relative)
        try:
            return mirror.delete(relative, fencing=fencing)
        except ApiError as exc:
            self._refused(exc, relative)
            raise

    # --- locks -----------------------------------------------------------------------------

    def _acquire(self, paths: list[str], mode: str, wait_s: float) -> list[dict[str, Any]]:
        """Take locks under the lease, all or none; remember the write locks for fenced writes."""
        self.check()
        try:
            granted = self._client.lock(paths, mode, step_id=self.id, token=self.token, wait_s=wait_s)
        except ApiError as exc:
            if exc.code == "stale_lease":
                self._interrupt("the lease was lost", lost=True)
                raise LeaseLost(f"the lease was lost: {exc.detail}") from exc
            raise
        if mode == "write":
            with self._guard:
                self._locks.extend(granted)
        return granted

    def _fencing(self, path: str) -> int:
        with self._guard:
            # The newest first: a lock taken with `step.lock` over one that came with the lease.
            held = next((lock for lock in reversed(self._locks) if covers(lock["path"], path)), None)
        if held is None:
            held = self._acquire([path], "write", self._worker.lock_wait_s)[0]
        return held["fencing"]

    def _forget_lock(self, lock: dict[str, Any]) -> None:
        with self._guard:
            self._locks = [held for held in self._locks if held.get("id") != lock.get("id")]

    def _refused(self, exc: ApiError, path: str) -> None:
        """A write the server did not take: drop the locks it no longer honours (the next write locks again)."""
        if exc.code in ("stale_fencing", "lock_required"):
            with self._guard:
                self._locks = [lock for lock in self._locks if not covers(lock["path"], path)]


class Worker:
    """Pulls the steps of its handlers' roles and runs them, `concurrency` at a time.

    `workspace` is where the project mirrors and undelivered reports are kept (default
    `$AM_WORKSPACE` or `~/.am-worker`). `shutdown_grace_s`: how long running steps may still
    take once the worker is told to stop. `lock_wait_s`: how long `step.lock` and an implicit
    lock of `step.write` wait for another holder.
    """

    def __init__(self, server: str, token: str, *, workspace: str | Path | None = None, name: str = "",
                 poll_wait_s: float = 10.0, shutdown_grace_s: float = 30.0, lock_wait_s: float = 10.0,
                 verbose: bool = False, client: Client | None = None) -> None:
        self.server = server
        self.client = client or Client(server, token)
        self._token_key = hashlib.sha256(token.encode()).hexdigest()[:16]
        self.workspace = Path(workspace or os.environ.get("AM_WORKSPACE") or "~/.am-worker").expanduser().resolve()
        self.name = name
        self.poll_wait_s = poll_wait_s
        self.shutdown_grace_s = shutdown_grace_s
        self.lock_wait_s = lock_wait_s
        self.verbose = verbose
        self.handlers: dict[str, Handler] = {}
        self.fallback: Handler | None = None
        self.roles: list[str] = []
        self.completed = self.failed = self.handed_back = self.lost = 0
        self._cond = threading.Condition()
        self._running: dict[str, Step] = {}
        self._stopping = threading.Event()
        self._hand_back_at: float | None = None
        self._signals = 0
        self._budget: int | None = None

    # --- registering handlers ----------------------------------------------------------------

    def step(self, *roles: str) -> Callable[[Handler], Handler]:
        """Decorator: the function handles steps of these roles (none: every role of the agent)."""
        def register(handler: Handler) -> Handler:
            self.register(handler, *roles)
            return handler
        return register

    def register(self, handler: Handler, *roles: str) -> None:
        if not callable(handler):
            raise TypeError(f"A step handler is a function taking the step, not {handler!r}.")
        if not roles:
            self.fallback = handler
        for role in roles:
            if role in self.handlers:
                raise ValueError(f"Role {role!r} already has a handler: {self.handlers[role]!r}.")
            self.handlers[role] = handler

    def _handler_for(self, role: str) -> Handler | None:
        return self.handlers.get(role, self.fallback)

    # --- running -------------------------------------------------------------------------------

    def run(self, *, concurrency: int = 1, max_steps: int | None = None, handle_signals: bool | None = None) -> None:
        """Work until stopped (SIGTERM/SIGINT or `stop()`), or until `max_steps` steps were taken.

        Signals are handled when run from the main thread (unless `handle_signals=False`)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1.")
        if not self.handlers and self.fallback is None:
            raise ValueError("No step handler: register one with @worker.step(role, ...).")
        self.workspace.mkdir(parents=True, exist_ok=True)
        roles = list(self.handlers)
        if self.fallback is not None:
            roles += [role for role in self.client.me()["roles"] if role not in roles]
        self.roles = roles
        self._budget = max_steps
        logger.info("%s working as %s, mirrors in %s (%d slot(s)), server %s", self.name or "agent",
                    ",".join(roles), self.workspace, concurrency, self.server)
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        previous = self._install_signal_handlers() if handle_signals else {}
        try:
            self.deliver_spooled()
            poller = threading.Thread(target=self._poll, args=(concurrency,), name="am-poller", daemon=True)
            poller.start()
            self._wait(poller)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.client.close()
        logger.info("Stopped after %d completed and %d failed step(s).", self.completed, self.failed)

    def stop(self, *, grace_s: float | None = None) -> None:
        """Pull no more steps; running ones have `grace_s` (default `shutdown_grace_s`) to finish,
        then are handed back. Safe from any thread and from a signal handler."""
        grace = self.shutdown_grace_s if grace_s is None else grace_s
        with self._cond:
            self._stopping.set()
            deadline = time.monotonic() + grace
            if self._hand_back_at is None or deadline < self._hand_back_at:
                self._hand_back_at = deadline
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _install_signal_handlers(self) -> dict[int, Any]:
        def on_signal(signum, frame):
            self._signals += 1
            if self._signals > 1:
                logger.warning("Second signal: handing running steps back now.")
                self.stop(grace_s=0)
            else:
                logger.info("Stopping: no new steps; running ones finish within %.0f s or are handed back.",
                            self.shutdown_grace_s)
                self.stop()

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    def _wait(self, poller: threading.Thread) -> None:
        """Until the poller has stopped and no step runs; past the grace period, tell running steps
        to stop, and past that, hand back for those that do not."""
        told_at: float | None = None
        while True:
            with self._cond:
                if not poller.is_alive() and not self._running:
                    return
                now = time.monotonic()
                running = list(self._running.values())
                if told_at is None and self._hand_back_at is not None and now >= self._hand_back_at:
                    told_at = now
                elif told_at is not None and now - told_at >= ABANDON_AFTER_S and not poller.is_alive():
                    break
                self._cond.wait(timeout=0.2)
            if told_at is not None:
                for step in running:
                    step._interrupt("the worker is shutting down")
        for step in running:
            if step._settle("abandoned"):
                logger.warning("%s did not stop within %.0f s of being told to", step.label, ABANDON_AFTER_S)
                self._hand_back(step, "the worker is shutting down")

    def _take(self, wanted: int) -> int:
        """How many of `wanted` steps the budget (`max_steps`) still allows; taken from it."""
        if self._budget is None:
            return wanted
        granted = min(wanted, self._budget)
        self._budget -= granted
        return granted

    def _poll(self, concurrency: int) -> None:
        warned_capacity = False
        while not self._stopping.is_set():
            with self._cond:
                while len(self._running) >= concurrency and not self._stopping.is_set():
                    self._cond.wait()
                if self._stopping.is_set():
                    return
                free = concurrency - len(self._running)
                if self._budget is not None:
                    free = min(free, self._budget)
                    if free <= 0:
                        self._stopping.set()  # the budget is spent: running steps finish at their pace
                        self._cond.notify_all()
                        return
            try:
                leases = self.client.pull_batch(self.roles, max=free, wait=self.poll_wait_s, retry_for=None,
                                                abort=self._stopping)
            except Unreachable:
                return
            except ApiError as exc:
                if exc.code == "at_capacity":
                    if not warned_capacity:
                        logger.warning("The server says the agent holds as many steps as its capacity; "
                                       "waiting for one to end (concurrency %d).", concurrency)
                        warned_capacity = True
                    with self._cond:
                        self._cond.wait(timeout=AT_CAPACITY_WAIT_S)
                    continue
                logger.error("The server refused the pull: %s %s. Fix the agent's roles or token.", exc.code, exc.detail)
                self.stop()
                return
            for lease in leases:
                with self._cond:
                    take = not self._stopping.is_set() and self._take(1) == 1
                    if take:
                        self._running[lease.step_id] = step = Step(self, lease)
                if not take:
                    self._hand_back(Step(self, lease), "the worker is stopping")
                    continue
                threading.Thread(target=self._slot, args=(step,), name=f"step-{step.key}", daemon=True).start()

    def _slot(self, step: Step) -> None:
        try:
            self._execute(step)
        except Exception:  # noqa: BLE001 - a bug here must free the slot, not hang the worker
            logger.exception("The worker failed on %s", step.label)
        finally:
            with self._cond:
                self._running.pop(step.id, None)
                self._cond.notify_all()

    # --- one step --------------------------------------------------------------------------------

    def _execute(self, step: Step) -> None:
        """Run one leased step: heartbeat it, call its handler, then report, hand back or drop it.

        All of it under the step's trace span (when tracing is on): the handler's LLM calls and the
        report are its children, and the span is the child of the server's span of this attempt.
        """
        with telemetry.step_span(step.lease):
            self._execute_step(step)

    def _execute_step(self, step: Step) -> None:
        logger.info("▶ %s  attempt %s", step.label, step.attempt)
        beat = threading.Thread(target=self._heartbeat, args=(step,), name=f"heartbeat-{step.key}", daemon=True)
        beat.start()
        try:
            outcome, why = self._call(step)
        finally:
            step._ended.set()
            step._new_iteration.set()
            beat.join(timeout=10)
        if not step._settle("finishing"):
            return  # the worker handed it back already (the handler outlived the shutdown)
        elapsed = time.monotonic() - step.started
        if step._lost:
            telemetry.step_outcome("lease_lost")
            self._count("lost")
            logger.warning("✘ %s  lease lost after %.1f s: dropping the work (another agent will do it)",
                           step.label, elapsed)
        elif step._cancelled_by_server:
            self._hand_back(step, "the server asked to stop (workflow cancelled or paused)")
        elif outcome is None:
            self._hand_back(step, why)
        else:
            self._report(step, outcome, elapsed)

    def _call(self, step: Step) -> tuple[Outcome | None, str]:
        """The handler's answer as an outcome; None (with why) when the step is to be handed back or dropped."""
        handler = self._handler_for(step.role)
        if handler is None:
            return None, f"no handler for the role {step.role!r}"
        try:
            if inspect.iscoroutinefunction(handler):
                value = self._run_async(lambda: handler(step), step)
            else:
                value = handler(step)
                if inspect.isawaitable(value):
                    value = self._run_async(lambda: value, step)
            # A result that came in after the worker asked it to stop is still reported (a cancelled
            # or lost step is not: `_execute` decides that).
            return self._outcome_of(value, step), ""
        except (Exception, asyncio.CancelledError) as exc:
            if step.cancelled:
                return None, step.cancel_reason  # whatever it raised, it was told to stop
            if isinstance(exc, HandBack):
                return None, str(exc) or "the handler handed it back"
            if isinstance(exc, Cancelled):
                return None, exc.reason
            if isinstance(exc, Retryable):
                return Outcome(status="failed", error=str(exc) or type(exc).__name__, retryable=True), ""
            if isinstance(exc, Failed):
                return Outcome(status="failed", error=str(exc) or type(exc).__name__), ""
            if isinstance(exc, Unreachable):  # the server went away mid-step: another attempt may succeed
                return Outcome(status="failed", error=traceback.format_exc(), retryable=True), ""
            logger.warning("%s raised %s: %s", step.label, type(exc).__name__, exc)
            return Outcome(status="failed", error=traceback.format_exc()), ""

    @staticmethod
    def _run_async(start: Callable[[], Awaitable[Any]], step: Step) -> Any:
        """Run an async handler on an event loop of its own, cancelling its task when the step must stop."""
        async def main() -> Any:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            step._when_interrupted(lambda: loop.call_soon_threadsafe(task.cancel))
            return await start()
        return asyncio.run(main())

    @staticmethod
    def _outcome_of(value: Any, step: Step) -> Outcome:
        if isinstance(value, Result):
            if value.usage is not None:
                step.add_usage(value.usage)
            return Outcome(status="completed", final_result=str(value.final_result or ""),
                           outputs=dict(value.outputs or {}))
        if value is None or isinstance(value, str):
            return Outcome(status="completed", final_result=value or "")
        if isinstance(value, dict):
            return Outcome(status="completed", outputs=value)
        return Outcome(status="failed", error=f"The handler returned a {type(value).__name__}: a handler returns "
                                              "a str, a dict of outputs, a Result or None.")

    def _heartbeat(self, step: Step) -> None:
        """Keep the lease alive every third of its TTL, and send each new iteration at once."""
        interval = max(1.0, float(step.lease.lease.get("ttl_s", 60)) / 3)
        last = time.monotonic()
        while not step._ended.is_set():
            step._new_iteration.wait(timeout=max(0.0, interval - (time.monotonic() - last)))
            step._new_iteration.clear()
            if step._ended.is_set():
                return
            with step._guard:
                batch, step._pending = step._pending[:HEARTBEAT_BATCH], step._pending[HEARTBEAT_BATCH:]
                if step._pending:
                    step._new_iteration.set()
            if not batch and time.monotonic() - last < interval:
                continue
            try:
                answer = self.client.heartbeat(step.id, step.token, batch)
                last = time.monotonic()
                if answer.get("cancel"):
                    step._interrupt("the server asked to stop (workflow cancelled or paused)", by_server=True)
                    return
            except ApiError as exc:
                if exc.code == "stale_lease" or exc.status in (403, 404):
                    step._interrupt("the lease was lost", lost=True)
                    return
                logger.warning("Heartbeat for %s refused: %s", step.label, exc)
            except Unreachable as exc:
                with step._guard:
                    step._pending[:0] = batch  # send them with the next heartbeat
                logger.warning("Heartbeat for %s could not reach the server: %s", step.label, exc)
            time.sleep(0.2)  # at most a few heartbeats a second, however fast the iterations come

    # --- reporting ---------------------------------------------------------------------------

    def _report(self, step: Step, outcome: Outcome, elapsed: float) -> None:
        telemetry.step_outcome(outcome.status, outcome.error)
        payload = {
            "step_id": step.id,
            "lease_token": step.token,
            "status": outcome.status,
            "final_result": outcome.final_result,
            "outputs": outcome.outputs,
            "iterations": step.history,
            "usage": step.usage.as_dict(),
            "execution_time_s": round(elapsed, 3),
            "error": outcome.error or None,
            "retryable": outcome.retryable,
        }
        try:
            # Kept until delivered: the server may be restarting. A worker told to stop for good
            # (past its grace period) spools it to disk and delivers it when it starts again.
            answer = self.client.report(payload, retry_for=None, abort=_Deadline(self))
        except ApiError as exc:
            logger.warning("✘ %s  result refused (%s: %s); dropped", step.label, exc.code, exc.detail)
            return
        except Unreachable as exc:
            path = self._spool(payload)
            logger.error("✘ %s  result not delivered (%s); kept in %s for the next start", step.label, exc, path)
            return
        if outcome.status == "completed":
            self._count("completed")
            released = answer.get("released") or []
            logger.info("✔ %s  completed in %.1f s%s", step.label, elapsed,
                        f"; released {', '.join(released)}" if released else "")
        else:
            self._count("failed")
            logger.info("✘ %s  failed in %.1f s (%s)%s", step.label, elapsed, outcome.error.strip().splitlines()[-1]
                        if outcome.error.strip() else "", ", will be retried" if answer.get("status") == "ready" else "")

    @property
    def spool_dir(self) -> Path:
        """Results not delivered yet, one directory per agent token (so a worker never sends another's)."""
        return self.workspace / ".am-pending-reports" / self._token_key

    def _spool(self, payload: dict[str, Any]) -> Path:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{payload['step_id']}.json"
        path.write_text(json.dumps(payload))
        return path

    def deliver_spooled(self) -> None:
        """Deliver results a previous run could not (the server was down when it stopped)."""
        if not self.spool_dir.is_dir():
            return
        for path in sorted(self.spool_dir.glob("*.json")):
            payload = json.loads(path.read_text())
            try:
                answer = self.client.report(payload, retry_for=60)
                logger.info("↑ delivered the kept result of step %s: %s", payload["step_id"], answer.get("status"))
            except ApiError as exc:
                logger.warning("↑ the kept result of step %s was refused (%s); dropped", payload["step_id"], exc.code)
            except Unreachable:
                logger.warning("↑ the server is still unreachable; the kept results wait for the next start")
                return
            path.unlink()

    def _count(self, outcome: str) -> None:
        with self._cond:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def _hand_back(self, step: Step, why: str) -> None:
        telemetry.step_outcome("handed_back")
        self._count("handed_back")
        try:
            self.client.release(step.id, step.token)
            logger.info("↩ %s  handed back: %s", step.label, why)
        except (ApiError, Unreachable) as exc:
            logger.info("↩ %s  stopped (%s); hand-back not needed: %s", step.label, why, exc)


class _Deadline:
    """Set (for `Client.request`'s `abort`) once the worker's grace period is over: stop retrying."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def is_set(self) -> bool:
        at = self.worker._hand_back_at
        return at is not None and time.monotonic() >= at


__all__ = ["Cancelled", "Failed", "HandBack", "LeaseLost", "Locks", "Outcome", "Result", "Retryable", "Step",
           "Worker"]
