"""Control actions racing the work, over a live server with concurrent HTTP clients.

Agents pull, heartbeat, report (some fail, some die and let their lease run out)
while the expiry sweep runs and a person cancels, pauses and resumes, retries
steps, or an audit sends steps back for rework. Afterwards: no answer was a 5xx,
PostgreSQL detected no deadlock, the counters equal the steps' statuses, and the
event log has one event per change, numbered without gaps.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.db import close_old_connections, connection

from coordination.models import STEP_COUNTER_FIELDS, Attempt, Event, Result, Step, StepStatus, Workflow
from coordination.services import agent_registry, audits, file_locks, leases, tokens, workflow_counters, workflow_creation, workflow_specs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

AGENTS = 6


def _graph(prefix: str = "") -> workflow_specs.WorkflowSpec:
    """Three roots, each fanning out to four steps, and diamonds joining them: releases, skips and fan-in."""
    steps = []
    for root in range(3):
        steps.append(_step(f"r{root}", lease_ttl_s=2))
        for leaf in range(4):
            steps.append(_step(f"r{root}l{leaf}", f"r{root}", lease_ttl_s=2,
                               files=(workflow_specs.FileSpec(path=f"src/{prefix}r{root}l{leaf}.py"),)))
    for join in range(4):
        steps.append(_step(f"j{join}", *(f"r{root}l{join}" for root in range(3)), lease_ttl_s=2))
    steps.append(_step("final", *(f"j{join}" for join in range(4)), lease_ttl_s=2))
    return workflow_specs.WorkflowSpec(name=f"race {prefix}", steps=tuple(steps), max_attempts=50,
                                       max_rework_rounds=5, project="races")


def _step(key: str, *deps: str, **extra) -> workflow_specs.StepSpec:
    return workflow_specs.StepSpec(key=key, name=f"Step {key}", role="developer", depends_on=tuple(deps), **extra)


@dataclass
class Run:
    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    control: Counter = field(default_factory=Counter)
    fail_final: float = 0.08
    fail_retry: float = 0.17
    abandon: float = 0.08
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, response: httpx.Response) -> None:
        with self.lock:
            self.statuses[(what, response.status_code)] += 1
            if response.status_code >= 500:
                self.server_errors.append(f"{what} {response.status_code} {response.text[:300]}")


def _agent_loop(run: Run, token: str, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=run.base_url, headers=headers, timeout=30) as client:
        while not run.stop.is_set():
            pulled = client.get("/v1/tasks/developer/ready?wait=0.3")
            run.record("pull", pulled)
            if pulled.status_code == 429:
                time.sleep(0.2)  # a lease it abandoned has not run out yet
            if pulled.status_code != 200:
                continue
            body = pulled.json()
            step_id, lease = body["step"]["id"], body["lease"]["token"]
            if rng.random() < run.abandon:
                continue  # the agent "dies": its lease runs out and the sweep hands the step back
            beat = client.post(f"/v1/steps/{step_id}/heartbeat", json={
                "lease_token": lease, "iterations": [{"iteration": 1, "thought": "t", "action": "a",
                                                      "observation": "o"}]})
            run.record("heartbeat", beat)
            roll = rng.random()
            if roll < run.fail_final:
                outcome = {"status": "failed", "error": "broken for good", "retryable": False}
            elif roll < run.fail_final + run.fail_retry:
                outcome = {"status": "failed", "error": "flaky", "retryable": True}
            else:
                outcome = {"status": "completed", "final_result": "done"}
            reported = client.post("/v1/report_result", json={"step_id": step_id, "lease_token": lease, **outcome})
            run.record("report", reported)


def _sweep_loop(run: Run) -> None:
    try:
        while not run.stop.is_set():
            leases.leases_sweep()
            file_locks.locks_sweep()
            time.sleep(0.05)
    finally:
        close_old_connections()
        connection.close()


def _deadlocks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        return cursor.fetchone()[0]


def _race(live_am: str, control, *, seconds: float, **settings) -> Run:
    """Run AGENTS agents and the sweep for `seconds` while `control(run, client)` steers; then check the books."""
    run = Run(base_url=live_am, **settings)
    agent_tokens = [agent_registry.agent_create(name=f"racer-{i}", roles=["developer"])[1] for i in range(AGENTS)]
    owner = get_user_model().objects.create_user(username="racer-owner", password="pw-racer-123", is_staff=True)
    owner_token = tokens.user_token_create(user=owner, name="races")
    deadlocks_before = _deadlocks()
    threads = [threading.Thread(target=_agent_loop, args=(run, token, i)) for i, token in enumerate(agent_tokens)]
    threads.append(threading.Thread(target=_sweep_loop, args=(run,)))
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(base_url=live_am, headers={"Authorization": f"Bearer {owner_token}"}, timeout=30) as client:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                control(run, client)
    finally:
        run.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert not run.server_errors, run.server_errors[:5]
    # A backend reports its deadlocks to the statistics within a second of going idle.
    time.sleep(1.5)
    assert _deadlocks() == deadlocks_before, "PostgreSQL detected a deadlock during the run"
    for workflow in Workflow.objects.all():
        _assert_books_balance(workflow)
    return run


def _assert_books_balance(workflow: Workflow) -> None:
    """Counters (read live, then folded into the row) equal the steps' statuses; leases and attempts agree;
    every event has a number of its own; one event per lease and per applied report."""
    actual = Counter(Step.objects.filter(workflow=workflow).values_list("status", flat=True))
    counters = {status: getattr(workflow, column) for status, column in STEP_COUNTER_FIELDS.items()}
    assert counters == {status: actual.get(status, 0) for status in StepStatus.values}, (workflow.name, counters, actual)
    assert sum(counters.values()) == workflow.total_steps
    in_progress = Step.objects.filter(workflow=workflow, status=StepStatus.IN_PROGRESS)
    assert not in_progress.filter(lease_attempt__isnull=True).exists()
    assert not Attempt.objects.filter(step__workflow=workflow, ended_at__isnull=True).exclude(
        step__status=StepStatus.IN_PROGRESS).exists(), "an attempt is open on a step nobody holds"
    seqs = list(Event.objects.filter(workflow=workflow).values_list("seq", flat=True))
    assert len(set(seqs)) == len(seqs), "two events share a number"
    # Folded into the row, the deltas leave the same counts there (the row's checks held all along).
    assert workflow_counters.workflow_fold([workflow.id]) == 1, "the fold was skipped: something held the row"
    row = Workflow.objects.filter(id=workflow.id).values(*STEP_COUNTER_FIELDS.values()).get()
    assert {status: row[column] for status, column in STEP_COUNTER_FIELDS.items()} == counters
    kinds = Counter(Event.objects.filter(workflow=workflow).values_list("kind", flat=True))
    assert kinds["step.leased"] == Attempt.objects.filter(step__workflow=workflow, agent__isnull=False).count()
    applied = Result.objects.filter(step__workflow=workflow).count()
    assert kinds["step.completed"] + kinds["step.retrying"] + kinds["step.failed"] == applied
    assert kinds["step.lease_expired"] == Attempt.objects.filter(step__workflow=workflow, outcome="expired").count()


class ControlRaceTests:
    def test_cancel_races_reports_heartbeats_pulls_and_the_sweep(self, live_am):
        rounds: list[tuple[Workflow, int]] = []

        def control(run: Run, client: httpx.Client) -> None:
            workflow = workflow_creation.workflow_create(spec=_graph(f"c{len(rounds)}-"))
            time.sleep(random.uniform(0.4, 1.2))
            cancelled = client.post(f"/v1/workflows/{workflow.id}/cancel")
            run.record("cancel", cancelled)
            assert cancelled.status_code in (200, 409), cancelled.text
            rounds.append((workflow, cancelled.status_code))

        _race(live_am, control, seconds=8)
        assert len(rounds) >= 5
        for workflow, status in rounds:
            workflow.refresh_from_db()
            kinds = Counter(Event.objects.filter(workflow=workflow).values_list("kind", flat=True))
            if status == 200:
                assert workflow.status == "cancelled" and kinds["workflow.cancelled"] == 1
                assert not Step.objects.filter(workflow=workflow, status__in=["pending", "ready", "in_progress"]).exists()
            else:  # it had finished first
                assert workflow.status in ("completed", "failed") and kinds["workflow.cancelled"] == 0

    def test_pause_and_resume_race_the_work(self, live_am):
        workflow = None

        def control(run: Run, client: httpx.Client) -> None:
            nonlocal workflow
            if workflow is None or Workflow.objects.get(id=workflow.id).status in ("completed", "failed"):
                workflow = workflow_creation.workflow_create(spec=_graph(f"p{run.control['created']}-"))
                run.control["created"] += 1
            for action in ("pause", "resume"):
                response = client.post(f"/v1/workflows/{workflow.id}/{action}")
                run.record(action, response)
                assert response.status_code in (200, 409), response.text
                time.sleep(random.uniform(0.05, 0.25))

        _race(live_am, control, seconds=8)
        for each in Workflow.objects.all():
            toggles = list(Event.objects.filter(workflow=each, kind__in=["workflow.paused", "workflow.resumed"])
                           .order_by("seq").values_list("kind", flat=True))
            # One event per change: a pause is never recorded twice in a row, nor a resume.
            assert all(a != b for a, b in zip(toggles, toggles[1:])), toggles
            assert toggles, "the workflow was never paused"

    def test_step_retry_races_the_work(self, live_am):
        workflow = None
        retried = Counter()

        def control(run: Run, client: httpx.Client) -> None:
            nonlocal workflow
            if workflow is None or Workflow.objects.get(id=workflow.id).status in ("completed", "failed"):
                workflow = workflow_creation.workflow_create(spec=_graph(f"t{run.control['created']}-"))
                run.control["created"] += 1
            detail = client.get(f"/v1/workflows/{workflow.id}")
            run.record("detail", detail)
            for step in detail.json()["steps"]:
                if step["status"] in ("failed", "cancelled"):
                    response = client.post(f"/v1/steps/{step['id']}/retry")
                    run.record("retry", response)
                    assert response.status_code in (200, 409), response.text
                    if response.status_code == 200:
                        retried[workflow.id] += 1
            time.sleep(0.05)

        _race(live_am, control, seconds=8, fail_final=0.2)
        assert sum(retried.values()) > 0, "no step was ever retried"
        for workflow_id, count in retried.items():
            assert Event.objects.filter(workflow_id=workflow_id, kind="step.retried").count() == count

    def test_audit_rework_races_the_work(self, live_am):
        workflow = None
        reworks = Counter()

        def control(run: Run, client: httpx.Client) -> None:
            nonlocal workflow
            if workflow is None or Workflow.objects.get(id=workflow.id).status == "failed":
                workflow = workflow_creation.workflow_create(spec=_graph(f"a{run.control['created']}-"))
                run.control["created"] += 1
            current = Workflow.objects.get(id=workflow.id)
            if current.status == "completed" and current.rework_round < current.max_rework_rounds:
                findings = audits.AuditFindings(
                    successful=False, feedback="redo", confidence=0.5, criteria=[], checks=[], steps_reviewed=[],
                    reviewer="race", rework_suggestions=[{"step": random.choice(["r0", "r1l2", "j3"]),
                                                          "reason": "not good enough"}])
                before = current.rework_round
                audits.audit_record(workflow_id=workflow.id, findings=findings)
                if Workflow.objects.get(id=workflow.id).rework_round == before + 1:
                    reworks[workflow.id] += 1
            elif current.status == "completed":
                workflow = None
            time.sleep(0.05)

        # Few failures and no abandoned leases, so that a workflow completes (retries back off for seconds)
        # and gets audited several times within the run; pulls, reports and the sweep still race each rework.
        _race(live_am, control, seconds=10, fail_final=0.0, fail_retry=0.03, abandon=0.0)
        assert sum(reworks.values()) > 0, "no rework ever happened"
        for workflow_id, count in reworks.items():
            assert Event.objects.filter(workflow_id=workflow_id, kind="workflow.rework").count() == count
