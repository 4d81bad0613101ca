"""The worker SDK (`agents.Worker`) against a real daphne server and PostgreSQL: handlers of our own."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents import Cancelled, LeaseLost, Result, Retryable, Worker
from agents.tests.test_worker_live import _wait_for
from coordination.models import Attempt, AttemptOutcome, FileVersion, Iteration, Result as StepResult, Step, Workflow
from coordination.services import leases, workflow_control, workflow_creation

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
BASE_DIR = Path(__file__).resolve().parent.parent.parent


class Running:
    """A worker running in a thread of the test, stopped (and joined) at the end of the block."""

    def __init__(self, worker: Worker, concurrency: int = 1) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, kwargs={"concurrency": concurrency}, daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc_info) -> None:
        self.worker.stop(grace_s=5)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the worker stops within its grace period"


def _worker(live_am, agent, tmp_path, **extra) -> Worker:
    return Worker(live_am, agent.token, workspace=tmp_path / "ws", poll_wait_s=1, **extra)


class ConcurrencyTests:
    def test_four_slots_work_a_twenty_step_workflow(self, live_am, tmp_path, make_agent, step, workflow_spec):
        keys = [f"s{i:02d}" for i in range(20)]
        # Half the steps declare their file (its lock comes with the lease), the others lock it themselves.
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            *[step(key, role="developer" if i % 2 else "tester",
                   files=((f"out/{key}.txt", "write"),) if i < 10 else ()) for i, key in enumerate(keys)],
            name="Twenty", project="twenty"))
        agent = make_agent("byo-4", ["developer", "tester"], capacity=4)
        worker = _worker(live_am, agent, tmp_path)
        gauge = {"now": 0, "peak": 0}
        gauge_lock = threading.Lock()

        @worker.step("developer", "tester")
        def work(step):
            with gauge_lock:
                gauge["now"] += 1
                gauge["peak"] = max(gauge["peak"], gauge["now"])
            try:
                step.log(thought="plan", action=f"write out/{step.key}.txt", observation=step.role)
                step.sleep(1.0)
                if step.files and step.role == "tester":  # the lock that came with the lease covers it
                    step.write(f"out/{step.key}.txt", f"{step.key} by {step.role}\n")
                else:  # undeclared, or declared and locked again (a holder never blocks itself)
                    with step.lock(f"out/{step.key}.txt"):
                        step.write(f"out/{step.key}.txt", f"{step.key} by {step.role}\n")
                return Result(final_result=f"done {step.key}", outputs={"key": step.key},
                              usage={"model": "byo", "prompt_tokens": 5, "completion_tokens": 3, "cost_usd": 0.01})
            finally:
                with gauge_lock:
                    gauge["now"] -= 1

        with Running(worker, concurrency=4):
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=90)
        assert gauge["peak"] == 4, "four steps ran at once, never more"
        assert worker.completed == 20 and worker.failed == 0
        results = {r.step.key: r for r in StepResult.objects.filter(step__workflow=workflow).select_related("step")}
        assert sorted(results) == keys
        assert all(r.final_result == f"done {key}" and r.outputs == {"key": key} and r.model == "byo"
                   and (r.prompt_tokens, r.completion_tokens) == (5, 3) and r.execution_time_s >= 1.0
                   for key, r in results.items())
        assert Iteration.objects.filter(attempt__step__workflow=workflow, thought="plan").count() == 20
        versions = FileVersion.objects.filter(project=workflow.project).select_related("lock", "step")
        assert sorted(v.path for v in versions) == [f"out/{key}.txt" for key in keys]
        for version in versions:
            # Every write was fenced by a write lock its own step held.
            assert version.fencing == version.lock.fencing and version.lock.step_id == version.step_id
        mirrored = tmp_path / "ws" / "twenty" / "out" / "s19.txt"
        assert mirrored.read_text() in ("s19 by developer\n", "s19 by tester\n")


class OutcomeTests:
    def test_retryable_is_retried_and_any_other_exception_fails_with_its_traceback(
            self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("flaky", max_attempts=3), step("broken", max_attempts=3), name="Outcomes"))
        worker = _worker(live_am, make_agent("byo-outcomes", ["developer"], capacity=2), tmp_path)

        @worker.step("developer")
        def unreliable_handler(step):
            if step.key == "broken":
                raise ValueError("boom in the handler")
            if step.attempt == 1:
                raise Retryable("upstream busy, try again")
            return f"ok on attempt {step.attempt}"

        with Running(worker, concurrency=2):
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status in ("completed", "failed")
                             and Step.objects.get(workflow=workflow, key="flaky").status == "completed", timeout=60)
        flaky = Step.objects.get(workflow=workflow, key="flaky")
        assert list(flaky.attempts.order_by("number").values_list("outcome", flat=True)) == [
            AttemptOutcome.RETRY, AttemptOutcome.COMPLETED]
        first, second = flaky.results.order_by("attempt__number")
        assert (first.status, first.retryable, first.error) == ("failed", True, "upstream busy, try again")
        assert (second.status, second.final_result) == ("completed", "ok on attempt 2")
        broken = Step.objects.get(workflow=workflow, key="broken")
        assert broken.status == "failed" and broken.attempts.count() == 1, "not retried, though attempts remain"
        error = broken.results.get().error
        assert error.startswith("Traceback (most recent call last):")
        assert "in unreliable_handler" in error and error.rstrip().endswith("ValueError: boom in the handler")
        assert broken.results.get().retryable is False


    def test_an_async_handler_completes_its_step(self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("a"), step("b", "a"), name="Async", project="async"))
        worker = _worker(live_am, make_agent("byo-async", ["developer"]), tmp_path)

        @worker.step()  # every role of the agent
        async def work(step):
            await asyncio.sleep(0.1)
            step.log(thought="awaited", observation=str(sorted(step.inputs)))
            step.write(f"{step.key}.txt", step.key)
            return {"inputs": sorted(step.inputs)}

        with Running(worker):
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=60)
        assert Step.objects.get(workflow=workflow, key="b").outputs == {"inputs": ["a"]}
        assert Iteration.objects.get(attempt__step__workflow=workflow, attempt__step__key="b").observation == "['a']"
        assert sorted(FileVersion.objects.filter(project=workflow.project).values_list("path", flat=True)) == [
            "a.txt", "b.txt"]


class CancellationTests:
    def test_a_cancelled_workflow_reaches_a_running_handler(self, live_am, tmp_path, make_agent, step, workflow_spec):
        """A sync handler sees the flag, then `Cancelled` at its next SDK call; an async one is cancelled."""
        sync_flow = workflow_creation.workflow_create(spec=workflow_spec(step("sync", lease_ttl_s=5), name="Sync"))
        async_flow = workflow_creation.workflow_create(spec=workflow_spec(step("async", lease_ttl_s=5,
                                                                               role="tester"), name="Async"))
        worker = _worker(live_am, make_agent("byo-cancel", ["developer", "tester"], capacity=2), tmp_path)
        seen = {}
        started = {"sync": threading.Event(), "async": threading.Event()}

        @worker.step("developer")
        def sync_handler(step):
            started["sync"].set()
            while not step.cancelled:
                time.sleep(0.05)
            seen["flag"] = step.cancel_reason
            try:
                step.log(thought="one more thing")
            except Cancelled as exc:
                seen["raised"] = exc
                raise
            return "never reported"

        @worker.step("tester")
        async def async_handler(step):
            started["async"].set()
            try:
                await asyncio.sleep(120)
            except asyncio.CancelledError:
                seen["async"] = step.cancel_reason
                raise
            return "never reported"

        with Running(worker, concurrency=2):
            assert started["sync"].wait(30) and started["async"].wait(30)
            workflow_control.workflow_cancel(workflow_id=sync_flow.id)
            workflow_control.workflow_cancel(workflow_id=async_flow.id)
            assert _wait_for(lambda: worker.handed_back == 2, timeout=30)
        assert "cancelled" in seen["flag"] and "cancelled" in seen["async"]
        assert type(seen["raised"]) is Cancelled
        assert not StepResult.objects.filter(step__workflow__in=[sync_flow, async_flow]).exists()
        assert set(Step.objects.filter(workflow__in=[sync_flow, async_flow]).values_list("status", flat=True)) == {
            "cancelled"}
        assert worker.completed == worker.failed == 0

    def test_a_lost_lease_stops_the_handler_and_its_work_is_dropped(self, live_am, tmp_path, make_agent, step,
                                                                     workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("taken", lease_ttl_s=5), name="Lost"))
        worker = _worker(live_am, make_agent("byo-lost", ["developer"]), tmp_path)
        seen = {}
        started = threading.Event()

        @worker.step("developer")
        def work(step):
            started.set()
            try:
                while True:
                    step.sleep(0.1)
            except LeaseLost as exc:
                seen["raised"] = exc
                raise

        with Running(worker):
            assert started.wait(30)
            # The lease is taken away behind the worker's back (as if it had expired and been swept).
            step_row = Step.objects.get(workflow=workflow)
            Step.objects.filter(id=step_row.id).update(lease_expires_at=step_row.lease_expires_at.replace(year=2000))
            leases.leases_sweep()
            assert _wait_for(lambda: worker.lost == 1, timeout=30)
        assert isinstance(seen["raised"], LeaseLost)
        assert not StepResult.objects.filter(step__workflow=workflow).exists()
        # The first attempt ended when its lease did; the worker may have pulled the step again since.
        assert Attempt.objects.get(step__workflow=workflow, number=1).outcome == AttemptOutcome.EXPIRED


class ShutdownTests:
    """SIGTERM to a worker process in the middle of a step."""

    def _start(self, live_am, agent, tmp_path, mode: str, grace_s: float):
        env = {**os.environ, "AM_SERVER": live_am, "AM_TOKEN": agent.token, "AM_WORKSPACE": str(tmp_path / "ws"),
               "AM_GRACE_S": str(grace_s), "PYTHONUNBUFFERED": "1"}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        log = open(tmp_path / f"{mode}.log", "w+")
        process = subprocess.Popen([sys.executable, "-m", "agents.tests.sdk_sigterm_worker", mode], cwd=BASE_DIR,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        return process, lambda: (tmp_path / f"{mode}.log").read_text()

    @pytest.mark.parametrize("mode", ["long", "deaf"])
    def test_a_step_outliving_the_grace_period_is_handed_back(self, mode, live_am, tmp_path, make_agent, step,
                                                              workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("slow"), name=f"Stop {mode}"))
        process, output = self._start(live_am, make_agent(f"byo-{mode}", ["developer"]), tmp_path, mode, grace_s=1)
        try:
            assert _wait_for(lambda: "started slow" in output(), timeout=30), output()
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, output()
        finally:
            if process.poll() is None:
                process.kill()
        # The grace period, then (for a handler that makes no SDK call) a few seconds to notice.
        assert time.monotonic() - stopped_at < 15
        assert "handed back" in output()
        step_row = Step.objects.get(workflow=workflow)
        assert step_row.status == "ready" and not step_row.results.exists()
        assert list(step_row.attempts.values_list("outcome", flat=True)) == [AttemptOutcome.RELEASED]

    def test_a_step_finishing_within_the_grace_period_is_reported_and_no_other_is_pulled(
            self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("first", priority=1), step("second"),
                                                                        name="Stop short"))
        process, output = self._start(live_am, make_agent("byo-short", ["developer"]), tmp_path, "short", grace_s=30)
        try:
            assert _wait_for(lambda: "started first" in output(), timeout=30), output()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, output()
        finally:
            if process.poll() is None:
                process.kill()
        first = Step.objects.get(workflow=workflow, key="first")
        assert first.status == "completed" and first.results.get().final_result == "first finished"
        second = Step.objects.get(workflow=workflow, key="second")
        assert second.status == "ready" and not second.attempts.exists(), "nothing pulled after SIGTERM"
