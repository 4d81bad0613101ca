"""The worker: pull a step, keep its lease, act in the workspace, report.

1. Each of `concurrency` slots long-polls `GET /v1/tasks/{roles}/ready`.
2. A background heartbeat keeps the lease (and the step's locks) alive and
   streams each new iteration as it happens; `cancel: true` or `409
   stale_lease` stops the loop.
3. The project's mirror under `--workspace` is brought up to date from the
   server; the Reason+Act loop acts through the tools on it. A write goes to
   the server under a write lock's fencing number (a file the step did not
   declare is first locked under the lease), then to the mirror.
4. The result is reported with the whole history, usage and execution time,
   retried with backoff until the server takes it (or refuses it for good).
On SIGTERM/SIGINT no new step is pulled; running steps finish within the
grace period, else they are handed back; a second signal hands them back at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import telemetry
from agents.client import ApiError, Client, Pulled, Unreachable
from agents.llm.base import LLM, Usage
from agents.react import Outcome, Stopped, run_loop
from agents.mirror import Mirror
from agents.tools import CommandPolicy, LeaseLost, ToolError, Workspace

logger = logging.getLogger("agents")


@dataclass
class WorkerConfig:
    server: str
    token: str
    roles: list[str]
    workspace: Path
    concurrency: int = 1
    poll_wait_s: float = 10.0
    max_iterations: int = 25
    shutdown_grace_s: float = 30.0
    verbose: bool = False
    name: str = ""
    # run_command is offered only when the operator allows it (--allow-commands).
    allow_commands: bool = False
    command_timeout_s: float = 120.0
    # How long a lock for a write waits for another holder to let go before the LLM is told of the conflict.
    lock_wait_s: float = 10.0


@dataclass
class StepRun:
    pulled: Pulled
    started: float = field(default_factory=time.monotonic)
    pending: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    new_iteration: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    abort: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        step = self.pulled.step
        return f"{self.pulled.workflow['name']} / {step['key']} ({step['role']})"


class Worker:
    def __init__(self, config: WorkerConfig, llm: LLM, client: Client | None = None) -> None:
        self.config = config
        self.llm = llm
        self.client = client or Client(config.server, config.token)
        self.stopping = threading.Event()
        self.hand_back_now = threading.Event()
        self.completed = 0
        self.failed = 0

    # --- lifecycle -------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum, frame):
            if self.stopping.is_set():
                logger.warning("Second signal: handing running steps back now.")
                self.hand_back_now.set()
            else:
                logger.info("Stopping: no new steps; running ones finish within %.0f s or are handed back.",
                            self.config.shutdown_grace_s)
                self.stopping.set()
                timer = threading.Timer(self.config.shutdown_grace_s, self.hand_back_now.set)
                timer.daemon = True  # must not keep the process alive once the slots are done
                timer.start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self, *, max_steps: int | None = None) -> None:
        """Work until stopped (or until `max_steps` steps have ended, for tests and one-shot runs)."""
        self.config.workspace.mkdir(parents=True, exist_ok=True)
        if not self.config.roles:
            self.config.roles = self.client.me()["roles"]
        logger.info("%s working as %s, mirrors in %s (%d slot(s)%s), server %s", self.config.name or "agent",
                    ",".join(self.config.roles), self.config.workspace, self.config.concurrency,
                    ", commands allowed" if self.config.allow_commands else "", self.config.server)
        self._budget = max_steps
        self._budget_lock = threading.Lock()
        self.deliver_spooled()
        slots = [threading.Thread(target=self._slot, name=f"slot-{i}", daemon=True)
                 for i in range(self.config.concurrency)]
        for slot in slots:
            slot.start()
        for slot in slots:
            while slot.is_alive():
                slot.join(timeout=0.5)
        self.client.close()
        logger.info("Stopped after %d completed and %d failed step(s).", self.completed, self.failed)

    def _take_budget(self) -> bool:
        with self._budget_lock:
            if self._budget is None:
                return True
            if self._budget <= 0:
                self.stopping.set()
                return False
            self._budget -= 1
            return True

    def _slot(self) -> None:
        while not self.stopping.is_set():
            try:
                pulled = self.client.pull(self.config.roles, wait=self.config.poll_wait_s, retry_for=None,
                                          abort=self.stopping)
            except Unreachable:
                return
            except ApiError as exc:
                logger.error("The server refused the pull: %s %s. Fix the agent's roles or token.", exc.code, exc.detail)
                self.stopping.set()
                return
            if pulled is None:
                continue
            if self.stopping.is_set() or not self._take_budget():
                self._hand_back(StepRun(pulled), "the worker is stopping")
                return
            self.execute(pulled)
            with self._budget_lock:
                if self._budget is not None and self._budget <= 0:
                    self.stopping.set()

    # --- one step --------------------------------------------------------------

    def execute(self, pulled: Pulled) -> None:
        with telemetry.step_span(pulled):
            self._execute(pulled)

    def _execute(self, pulled: Pulled) -> None:
        run = StepRun(pulled)
        step = pulled.step
        logger.info("▶ %s  attempt %s", run.label, step.get("attempt", 1))
        beat = threading.Thread(target=self._heartbeat, args=(run,), name=f"heartbeat-{step['key']}", daemon=True)
        beat.start()
        usage = Usage()
        outcome: Outcome | None = None
        why = "the worker is shutting down"
        try:
            mirror = Mirror(self.config.workspace, pulled.workflow.get("project") or "default", self.client)
            mirror.sync()
        except (ApiError, Unreachable, OSError) as exc:
            mirror = None
            why = f"the mirror could not be brought up to date ({exc})"
            logger.warning("%s: %s", run.label, why)
        if mirror is not None:
            workspace = Workspace(
                mirror.root, mirror=mirror, locks=pulled.lease.get("locks", []),
                lock_writer=lambda paths: self._lock_for_write(run, paths),
                commands=CommandPolicy(self.config.command_timeout_s) if self.config.allow_commands else None,
            )
            try:
                outcome = run_loop(
                    llm=self.llm, step=step, workflow=pulled.workflow, workspace=workspace,
                    on_iteration=lambda it: self._record(run, it), should_stop=lambda: self._should_stop(run),
                    max_iterations=self.config.max_iterations, usage=usage,
                )
            except (Stopped, LeaseLost):
                outcome = None
            except Exception as exc:  # noqa: BLE001 - a bug in a tool must fail the step, not the worker
                logger.exception("Unexpected error in %s", run.label)
                outcome = Outcome(status="failed", error=f"Worker error: {type(exc).__name__}: {exc}", retryable=True)
        run.done.set()
        run.new_iteration.set()
        beat.join(timeout=10)
        elapsed = time.monotonic() - run.started
        if run.lost.is_set():
            logger.warning("✘ %s  lease lost after %.1f s: dropping the work (another agent will do it)", run.label, elapsed)
            telemetry.step_outcome("lease_lost")
            return
        if run.cancelled.is_set():
            self._hand_back(run, "the server asked to stop (workflow cancelled or paused)")
            return
        if outcome is None:
            self._hand_back(run, why)
            return
        self._report(run, outcome, usage, elapsed)

    def _should_stop(self, run: StepRun) -> bool:
        return run.cancelled.is_set() or run.lost.is_set() or self.hand_back_now.is_set()

    def _record(self, run: StepRun, iteration: dict[str, Any]) -> None:
        with run.lock:
            run.history.append(iteration)
            run.pending.append(iteration)
        run.new_iteration.set()
        if self.config.verbose:
            logger.info("   %s #%d thought: %s", run.pulled.step["key"], iteration["iteration"], iteration["thought"])
            logger.info("   %s #%d action:  %s", run.pulled.step["key"], iteration["iteration"], iteration["action"])

    def _heartbeat(self, run: StepRun) -> None:
        """Keep the lease alive every third of its TTL, and send each new iteration at once."""
        interval = max(1.0, float(run.pulled.lease.get("ttl_s", 60)) / 3)
        last = time.monotonic()
        while not run.done.is_set():
            run.new_iteration.wait(timeout=max(0.0, interval - (time.monotonic() - last)))
            run.new_iteration.clear()
            if run.done.is_set():
                return
            with run.lock:
                batch, run.pending = run.pending, []
            if not batch and time.monotonic() - last < interval:
                continue
            try:
                answer = self.client.heartbeat(run.pulled.step_id, run.pulled.token, batch)
                last = time.monotonic()
                if answer.get("cancel"):
                    run.cancelled.set()
                    return
            except ApiError as exc:
                if exc.code == "stale_lease" or exc.status in (403, 404):
                    run.lost.set()
                    return
                logger.warning("Heartbeat for %s refused: %s", run.label, exc)
            except Unreachable as exc:
                with run.lock:
                    run.pending[:0] = batch  # send them with the next heartbeat
                logger.warning("Heartbeat for %s could not reach the server: %s", run.label, exc)
            time.sleep(0.2)  # at most a few heartbeats a second, however fast the iterations come

    def _lock_for_write(self, run: StepRun, paths: list[str]) -> list[dict[str, Any]]:
        """Write locks on `paths` under the step's lease, all or none: the granted locks (with fencing)."""
        named = ", ".join(paths)
        try:
            return self.client.lock(paths, "write", step_id=run.pulled.step_id, token=run.pulled.token,
                                    wait_s=self.config.lock_wait_s)
        except ApiError as exc:
            if exc.code == "stale_lease":
                run.lost.set()
                raise LeaseLost() from exc
            if exc.code == "lock_conflict":
                raise ToolError(f"lock_conflict on {named}: {exc.detail}") from exc
            raise ToolError(f"Could not lock {named}: {exc.detail}") from exc
        except Unreachable as exc:
            raise ToolError(f"Could not lock {named}: the server is unreachable ({exc}); try again later.") from exc

    def _report(self, run: StepRun, outcome: Outcome, usage: Usage, elapsed: float) -> None:
        payload = {
            "step_id": run.pulled.step_id,
            "lease_token": run.pulled.token,
            "status": outcome.status,
            "final_result": outcome.final_result,
            "outputs": outcome.outputs,
            "iterations": run.history,
            "usage": usage.as_dict(),
            "execution_time_s": round(elapsed, 3),
            "error": outcome.error or None,
            "retryable": outcome.retryable,
        }
        telemetry.step_outcome(outcome.status, outcome.error)
        try:
            # Kept until delivered: the server may be restarting. A worker told to stop
            # for good spools it to disk and delivers it when it starts again.
            answer = self.client.report(payload, retry_for=None, abort=self.hand_back_now)
        except ApiError as exc:
            logger.warning("✘ %s  result refused (%s: %s); dropped", run.label, exc.code, exc.detail)
            return
        except Unreachable as exc:
            path = self._spool(payload)
            logger.error("✘ %s  result not delivered (%s); kept in %s for the next start", run.label, exc, path)
            return
        if outcome.status == "completed":
            self.completed += 1
            released = answer.get("released") or []
            logger.info("✔ %s  completed in %.1f s%s", run.label, elapsed,
                        f"; released {', '.join(released)}" if released else "")
        else:
            self.failed += 1
            logger.info("✘ %s  failed in %.1f s (%s)%s", run.label, elapsed, outcome.error,
                        ", will be retried" if answer.get("status") == "ready" else "")

    @property
    def spool_dir(self) -> Path:
        return self.config.workspace / ".am-pending-reports"

    def _spool(self, payload: dict[str, Any]) -> Path:
        import json

        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{payload['step_id']}.json"
        path.write_text(json.dumps(payload))
        return path

    def deliver_spooled(self) -> None:
        """Deliver results a previous run could not (the server was down when it stopped)."""
        import json

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

    def _hand_back(self, run: StepRun, why: str) -> None:
        telemetry.step_outcome("handed_back")
        try:
            self.client.release(run.pulled.step_id, run.pulled.token)
            logger.info("↩ %s  handed back: %s", run.label, why)
        except (ApiError, Unreachable) as exc:
            logger.info("↩ %s  stopped (%s); hand-back not needed: %s", run.label, why, exc)
