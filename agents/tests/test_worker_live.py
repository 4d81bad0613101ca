"""Real worker processes (`python -m agents`) against a real daphne server and PostgreSQL."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordination.services import leases, workflow_control, workflow_creation
from coordination.models import Attempt, AttemptOutcome, Iteration, Result, Step, Workflow, WorkspaceFile

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
BASE_DIR = Path(__file__).resolve().parent.parent.parent


class WorkerProcess:
    def __init__(self, server: str, agent, workspace: Path, log: Path, *, delay: float = 0.0, extra=()):
        env = {**os.environ, "AM_SCRIPTED_DELAY_S": str(delay), "PYTHONUNBUFFERED": "1"}
        env.pop("DJANGO_SETTINGS_MODULE", None)  # a worker needs no server settings
        self.log = log
        self.handle = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agents", "--server", server, "--token", agent.token, "--workspace",
             str(workspace), "--llm", "scripted", "--name", agent.agent.name, *extra],
            cwd=BASE_DIR, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        if not self.handle.closed:
            self.handle.flush()
        return self.log.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.handle.close()
        return code


def _wait_for(predicate, timeout=60, every=0.2, sweep=False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sweep:
            leases.leases_sweep()
        if predicate():
            return True
        time.sleep(every)
    return False


class WorkerTests:
    def test_several_workers_complete_a_multi_role_workflow(self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("scope", role="researcher", files=(("research/scope.md", "write"),)),
            step("market", "scope", role="analyst", files=(("research/market.md", "write"),)),
            step("users", "scope", role="researcher", files=(("research/users.md", "write"),)),
            step("build", "market", "users", role="developer", files=(("src/app.py", "write"),)),
            step("test", "build", role="tester", files=(("tests/test_app.py", "write"), ("src/app.py", "read"))),
            step("report", "test", role="writer"),
            name="Team work",
        ))
        agents = [make_agent("w-research", ["researcher", "analyst"], capacity=2),
                  make_agent("w-dev", ["developer", "tester"]),
                  make_agent("w-writer", ["writer"])]
        workspace = tmp_path / "shared"
        workers = [WorkerProcess(live_am, agent, workspace, tmp_path / f"{agent.agent.name}.log",
                                 extra=("--concurrency", "2") if agent.agent.capacity == 2 else ())
                   for agent in agents]
        try:
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=90), \
                [w.output()[-2000:] for w in workers]
        finally:
            codes = [worker.stop() for worker in workers]
        assert codes == [0, 0, 0], "SIGTERM stops a worker cleanly"
        # Every file reached the server, and the mirror the three workers share holds it as the server does.
        for path in ["research/scope.md", "research/market.md", "src/app.py", "tests/test_app.py", "notes/report.md"]:
            stored = WorkspaceFile.objects.get(project=workflow.project, path=path, deleted=False)
            mirrored = workspace / workflow.project.name / path
            assert mirrored.is_file() and hashlib.sha256(mirrored.read_bytes()).hexdigest() == stored.sha256, path
        results = Result.objects.filter(step__workflow=workflow)
        assert results.count() == 6 and set(results.values_list("model", flat=True)) == {"scripted"}
        assert all(r.attempt.iterations.count() >= 3 and r.execution_time_s is not None for r in results)
        report = Step.objects.get(workflow=workflow, key="report")
        assert report.outputs["files_written"] == ["notes/report.md"]  # undeclared: locked through the API first
        assert report.locks.filter(path="notes/report.md", mode="write").exists()
        log = workers[2].output()
        assert "▶ Team work / report (writer)" in log and "✔ Team work / report (writer)  completed in" in log

    def test_a_killed_worker_loses_its_lease_and_another_finishes_the_step(self, live_am, tmp_path, make_agent, step,
                                                                           workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("slow", lease_ttl_s=5), name="Crash"))
        doomed = make_agent("doomed", ["developer"])
        rescuer = make_agent("rescuer", ["developer"])
        first = WorkerProcess(live_am, doomed, tmp_path / "a", tmp_path / "doomed.log", delay=1.5)
        try:
            assert _wait_for(lambda: Iteration.objects.filter(attempt__step__workflow=workflow).exists(), timeout=30)
            first.stop(signal.SIGKILL)
            # No heartbeat any more: once the lease runs out the sweep puts the step back.
            assert _wait_for(lambda: Step.objects.get(workflow=workflow).status == "ready", timeout=30, sweep=True)
            second = WorkerProcess(live_am, rescuer, tmp_path / "b", tmp_path / "rescuer.log")
            try:
                assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=60)
            finally:
                second.stop()
        finally:
            if first.process.poll() is None:
                first.stop(signal.SIGKILL)
        attempts = list(Attempt.objects.filter(step__workflow=workflow).order_by("number")
                        .values_list("agent__name", "outcome"))
        assert attempts == [("doomed", AttemptOutcome.EXPIRED), ("rescuer", AttemptOutcome.COMPLETED)]
        assert Result.objects.get(step__workflow=workflow).attempt.agent.name == "rescuer"

    def test_a_worker_that_gets_409_drops_its_result(self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("taken", lease_ttl_s=30), name="Stale"))
        agent = make_agent("zombie", ["developer"])
        worker = WorkerProcess(live_am, agent, tmp_path / "z", tmp_path / "zombie.log", delay=1.0)
        try:
            assert _wait_for(lambda: Iteration.objects.filter(attempt__step__workflow=workflow).exists(), timeout=30)
            # The lease is taken away behind the worker's back (as if it had expired and been swept).
            step_row = Step.objects.get(workflow=workflow)
            Step.objects.filter(id=step_row.id).update(lease_expires_at=step_row.lease_expires_at.replace(year=2000))
            leases.leases_sweep()
            Workflow.objects.filter(id=workflow.id)  # the step is ready again for anyone
            assert _wait_for(lambda: "lease lost" in worker.output(), timeout=30), worker.output()
        finally:
            worker.stop()
        assert not Result.objects.filter(step__workflow=workflow, attempt__number=1).exists()
        assert "dropping the work" in worker.output()

    def test_a_cancelled_workflow_stops_the_worker_which_reports_nothing(self, live_am, tmp_path, make_agent, step,
                                                                         workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("long", lease_ttl_s=6), name="Cancel me"))
        agent = make_agent("obedient", ["developer"])
        worker = WorkerProcess(live_am, agent, tmp_path / "c", tmp_path / "obedient.log", delay=1.0)
        try:
            assert _wait_for(lambda: Iteration.objects.filter(attempt__step__workflow=workflow).exists(), timeout=30)
            workflow_control.workflow_cancel(workflow_id=workflow.id)
            # It learns it from its heartbeat (cancel: true) or from a refused lock, whichever comes first.
            assert _wait_for(lambda: "the server asked to stop" in worker.output()
                             or "dropping the work" in worker.output(), timeout=30), worker.output()
        finally:
            worker.stop()
        assert not Result.objects.filter(step__workflow=workflow).exists()
        assert Step.objects.get(workflow=workflow).status == "cancelled"
