"""Over real HTTP against a real daphne process and PostgreSQL."""

import threading
import time
from collections import Counter
from datetime import datetime, timezone

import httpx
import pytest
from django.db import connection

from coordination.services import agent_registry, pull, reports, workflow_control, workflow_counters, workflow_creation
from coordination.models import Agent, AgentUsage, Attempt, AttemptOutcome, Result, Step, Workflow, WorkflowDelta

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class ConcurrentPullTests:
    def test_16_agents_on_400_steps_complete_each_exactly_once(self, live_am, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(*[step(f"s{i}") for i in range(400)], name="big"))
        agents = [make_agent(f"agent-{i}", ["developer"]) for i in range(16)]
        completed: Counter = Counter()
        errors: list[str] = []

        def work(agent) -> None:
            with httpx.Client(base_url=live_am, headers=_auth(agent.token), timeout=30) as client:
                while True:
                    pulled = client.get("/v1/tasks/developer/ready")
                    if pulled.status_code == 204:
                        return
                    if pulled.status_code != 200:
                        errors.append(f"pull {pulled.status_code} {pulled.text}")
                        return
                    body = pulled.json()
                    reported = client.post("/v1/report_result", json={
                        "step_id": body["step"]["id"], "lease_token": body["lease"]["token"],
                        "status": "completed", "final_result": f"done by {agent.agent.name}",
                    })
                    if reported.status_code != 200:
                        errors.append(f"report {reported.status_code} {reported.text}")
                        return
                    completed[body["step"]["key"]] += 1

        threads = [threading.Thread(target=work, args=(agent,)) for agent in agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors[:5]
        assert len(completed) == 400 and set(completed.values()) == {1}
        # No lease was ever granted twice: exactly one attempt per step, each completed.
        attempts = Attempt.objects.filter(step__workflow=workflow)
        assert attempts.count() == 400
        assert set(attempts.values_list("outcome", flat=True)) == {AttemptOutcome.COMPLETED}
        assert attempts.values("step_id").distinct().count() == 400
        assert Result.objects.filter(step__workflow=workflow).count() == 400
        assert len({name for name in attempts.values_list("agent__name", flat=True)}) > 1
        workflow.refresh_from_db()
        assert workflow.status == "completed" and workflow.n_completed == 400


class ConcurrentBatchPullTests:
    def test_batch_and_single_pullers_never_share_a_step_and_the_counters_stay_exact(
            self, live_am, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(
            spec=workflow_spec(*[step(f"s{i}") for i in range(300)], name="batched"))
        batchers = [make_agent(f"batcher-{i}", ["developer"], capacity=4) for i in range(6)]
        singles = [make_agent(f"single-{i}", ["developer"], capacity=1) for i in range(2)]
        completed: Counter = Counter()
        most_held: dict[str, int] = {}
        errors: list[str] = []

        def work(agent, batch: bool) -> None:
            held: list[dict] = []
            with httpx.Client(base_url=live_am, headers=_auth(agent.token), timeout=30) as client:
                while True:
                    free = agent.agent.capacity - len(held)
                    if free:
                        pulled = client.get("/v1/tasks/developer/ready", params={"max": free} if batch else None)
                        if pulled.status_code == 200:
                            body = pulled.json()
                            held.extend(body["leases"] if batch else [body])
                        elif pulled.status_code != 204:
                            errors.append(f"pull {pulled.status_code} {pulled.text}")
                            return
                        elif not held:
                            return
                    most_held[agent.agent.name] = max(most_held.get(agent.agent.name, 0), len(held))
                    lease = held.pop(0)  # report the oldest, as a worker finishing them one at a time
                    reported = client.post("/v1/report_result", json={
                        "step_id": lease["step"]["id"], "lease_token": lease["lease"]["token"],
                        "status": "completed", "final_result": f"done by {agent.agent.name}",
                    })
                    if reported.status_code != 200:
                        errors.append(f"report {reported.status_code} {reported.text}")
                        return
                    completed[lease["step"]["key"]] += 1

        threads = [threading.Thread(target=work, args=(agent, True)) for agent in batchers]
        threads += [threading.Thread(target=work, args=(agent, False)) for agent in singles]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors[:5]
        assert len(completed) == 300 and set(completed.values()) == {1}
        # Checked from the attempt rows: one attempt per step, every one completed, no agent past its capacity.
        attempts = Attempt.objects.filter(step__workflow=workflow)
        assert attempts.count() == 300
        assert attempts.values("step_id").distinct().count() == 300
        assert set(attempts.values_list("outcome", flat=True)) == {AttemptOutcome.COMPLETED}
        assert max(most_held[agent.agent.name] for agent in batchers) > 1  # batches really held several
        assert all(most_held.get(agent.agent.name, 0) <= 1 for agent in singles)
        # The workflow's counters, read as the status endpoint reads them, match the steps.
        workflow.refresh_from_db()
        assert workflow.status == "completed"
        counts = Counter(Step.objects.filter(workflow=workflow).values_list("status", flat=True))
        assert counts == Counter({"completed": 300})
        assert (workflow.n_completed, workflow.n_ready, workflow.n_in_progress, workflow.n_pending) == (300, 0, 0, 0)
        # Folded into the row, the deltas the run left give the same figures.
        assert workflow_counters.workflow_fold([workflow.id]) == 1
        assert not WorkflowDelta.objects.filter(workflow=workflow).exists()
        assert Workflow.objects.filter(id=workflow.id).values_list(
            "n_completed", "n_ready", "n_in_progress", "n_pending").get() == (300, 0, 0, 0)
        # Each agent's kept usage counts exactly the results it reported.
        kept = dict(AgentUsage.objects.values_list("agent__name", "steps_completed"))
        reported = Counter(attempts.values_list("agent__name", flat=True))
        assert kept == dict(reported)


class LongPollTests:
    def test_a_waiting_pull_wakes_when_a_step_becomes_ready_holding_no_connection(self, live_am, make_agent, step, workflow_spec):
        agent = make_agent("waiter", ["researcher"])
        outcome: dict = {}

        def wait_for_step() -> None:
            started = time.monotonic()
            response = httpx.get(f"{live_am}/v1/tasks/researcher/ready?wait=20", headers=_auth(agent.token), timeout=30)
            outcome["status"] = response.status_code
            outcome["elapsed"] = time.monotonic() - started
            outcome["body"] = response.json() if response.status_code == 200 else None

        thread = threading.Thread(target=wait_for_step)
        thread.start()
        time.sleep(1.5)
        # While it waits, the server holds no database connection for it (only the LISTEN one).
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
            others = [row[0] for row in cursor.fetchall()]
        assert all(query.startswith(("LISTEN", "SELECT 1")) for query in others), others
        assert thread.is_alive(), "the pull should still be waiting"
        workflow_creation.workflow_create(spec=workflow_spec(step("R", role="researcher")))
        thread.join(timeout=25)
        assert outcome["status"] == 200
        assert outcome["body"]["step"]["key"] == "R"
        assert outcome["elapsed"] < 15, "woken by the notification, well before the 20 s deadline"

    def test_steps_released_to_many_waiting_agents_each_reach_one_of_them(self, live_am, make_agent, step,
                                                                           workflow_spec):
        builder = make_agent("builder", ["builder"])
        reviewers = [make_agent(f"reviewer-{i}", ["reviewer"]) for i in range(8)]
        workflow_creation.workflow_create(spec=workflow_spec(
            step("A", role="builder"), *(step(f"R{i}", "A", role="reviewer") for i in range(3))))
        outcomes: list[tuple[int, float, str]] = []

        def wait_for_step(agent) -> None:
            started = time.monotonic()
            response = httpx.get(f"{live_am}/v1/tasks/reviewer/ready?wait=6", headers=_auth(agent.token), timeout=30)
            key = response.json()["step"]["key"] if response.status_code == 200 else ""
            outcomes.append((response.status_code, time.monotonic() - started, key))

        threads = [threading.Thread(target=wait_for_step, args=(agent,)) for agent in reviewers]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        lease = pull.step_pull(agent=builder.agent, roles=["builder"])
        reports.step_report(step_id=lease.step.id, agent=builder.agent, lease_token=lease.token,
                            outcome=reports.Outcome(status="completed"))
        for thread in threads:
            thread.join(timeout=30)
        got = sorted(outcome for outcome in outcomes if outcome[0] == 200)
        # The three released steps went to three waiting agents at once, woken by the report's notification ...
        assert sorted(key for _status, _elapsed, key in got) == ["R0", "R1", "R2"]
        assert all(elapsed < 5 for _status, elapsed, _key in got), got
        # ... and the five others waited out their deadline: nothing was handed to them.
        rest = [outcome for outcome in outcomes if outcome[0] != 200]
        assert [status for status, _elapsed, _key in rest] == [204] * 5
        assert all(elapsed >= 5.5 for _status, elapsed, _key in rest), rest

    def test_a_waiting_pull_times_out_with_204(self, live_am, make_agent):
        agent = make_agent("patient", ["analyst"])
        started = time.monotonic()
        response = httpx.get(f"{live_am}/v1/tasks/analyst/ready?wait=1", headers=_auth(agent.token), timeout=10)
        assert response.status_code == 204
        assert time.monotonic() - started >= 0.9

    def test_a_step_of_a_resumed_workflow_wakes_a_waiting_pull(self, live_am, make_agent, step, workflow_spec):
        agent = make_agent("resumer", ["writer"])
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("W", role="writer")))
        workflow_control.workflow_pause(workflow_id=workflow.id)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(
            status=httpx.get(f"{live_am}/v1/tasks/writer/ready?wait=20", headers=_auth(agent.token), timeout=30).status_code))
        thread.start()
        time.sleep(1.0)
        workflow_control.workflow_resume(workflow_id=workflow.id)
        thread.join(timeout=25)
        assert result["status"] == 200
        assert Step.objects.get(workflow=workflow).status == "in_progress"
        assert Workflow.objects.get(id=workflow.id).n_in_progress == 1


class DeadAgentTests:
    def test_a_dead_agents_step_is_handed_out_again_by_the_celery_sweep(self, live_celery, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", lease_ttl_s=2)))
        dead = make_agent("dead", ["developer"])
        alive = make_agent("alive", ["developer"])
        lease = pull.step_pull(agent=dead.agent, roles=["developer"])
        assert isinstance(lease, pull.Lease)
        # The dead agent never heartbeats. Within TTL (2 s) + one sweep (1 s) + start-up slack,
        # beat and the worker put the step back and another agent gets it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            again = pull.step_pull(agent=alive.agent, roles=["developer"])
            if isinstance(again, pull.Lease):
                break
            time.sleep(0.25)
        else:
            pytest.fail("the expired lease was not swept within 30 s")
        assert again.step.id == lease.step.id and again.step.attempt == 2
        outcomes = list(Attempt.objects.filter(step=lease.step).order_by("number").values_list("outcome", flat=True))
        assert outcomes == [AttemptOutcome.EXPIRED, ""]
        assert workflow.events.filter(kind="step.lease_expired").exists()


class LockAwareLongPollTests:
    def test_a_pull_waiting_on_a_locked_file_wakes_when_the_lock_is_released(self, live_am, make_agent, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(
            step("R1", files=(("report.md", "write"),)), step("R2", files=(("report.md", "write"),))))
        first = make_agent("first", ["developer"])
        second = make_agent("second", ["developer"])
        lease = pull.step_pull(agent=first.agent, roles=["developer"])
        outcome: dict = {}

        def wait_for_step() -> None:
            response = httpx.get(f"{live_am}/v1/tasks/developer/ready?wait=20", headers=_auth(second.token), timeout=30)
            outcome["status"] = response.status_code
            outcome["key"] = response.json()["step"]["key"] if response.status_code == 200 else None
            outcome["at"] = time.monotonic()

        thread = threading.Thread(target=wait_for_step)
        thread.start()
        time.sleep(1.5)
        assert thread.is_alive(), "R2 is ready but its file is locked: the pull must wait"
        reported_at = time.monotonic()
        reports.step_report(step_id=lease.step.id, agent=first.agent, lease_token=lease.token,
                             outcome=reports.Outcome(status="completed"))
        thread.join(timeout=25)
        assert outcome["status"] == 200 and outcome["key"] == "R2"
        assert outcome["at"] - reported_at < 10


# Long ago: an agent read from the database with this `last_seen_at` is touched at once.
LONG_AGO = datetime(2000, 1, 1, tzinfo=timezone.utc)
# How long a committed change may take to reach the server (a NOTIFY takes milliseconds).
NOTIFY_DEADLINE_S = 5.0


def _set_by_hand(agent_id, column: str, value) -> None:
    """A committed change made in SQL, not through a service (as someone at a psql prompt would)."""
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE coordination_agent SET {column} = %s WHERE id = %s", [value, agent_id])


def _me(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/agents/me", headers=_auth(token), timeout=10)


def _until_served_from_cache(url: str, agent) -> None:
    """Wait until the server answers this agent's requests from its cache.

    The proof: `last_seen_at` set long ago by hand (an update the trigger ignores, so nothing is dropped)
    makes a request that reads the agent's row write it again at once, and leaves it alone when the request
    took the agent from the cache, where it was seen a moment ago.
    """
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert _me(url, agent.token).status_code == 200
        _set_by_hand(agent.agent.id, "last_seen_at", LONG_AGO)
        assert _me(url, agent.token).status_code == 200
        if Agent.objects.get(id=agent.agent.id).last_seen_at == LONG_AGO:
            return
        time.sleep(0.2)
    pytest.fail("the server never answered the agent from its cache")


def _until_status(url: str, token: str, status: int) -> httpx.Response:
    """The server's answer once it is `status`, or its last answer after NOTIFY_DEADLINE_S."""
    deadline = time.monotonic() + NOTIFY_DEADLINE_S
    while True:
        response = _me(url, token)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


class AgentCacheTests:
    """The server keeps agents by token; a change committed in another process reaches it by NOTIFY."""

    def test_an_agent_disabled_through_the_service_is_refused_by_the_server(self, live_am, make_agent):
        agent = make_agent("to-disable", ["developer"])
        _until_served_from_cache(live_am, agent)
        agent_registry.agent_set_enabled(agent_id=agent.agent.id, enabled=False)  # committed: no test transaction
        response = _until_status(live_am, agent.token, 401)
        assert response.status_code == 401 and "disabled" in response.json()["detail"]
        agent_registry.agent_set_enabled(agent_id=agent.agent.id, enabled=True)
        assert _until_status(live_am, agent.token, 200).status_code == 200

    def test_an_agent_disabled_by_hand_in_sql_is_refused_by_the_server(self, live_am, make_agent):
        agent = make_agent("disabled-by-hand", ["developer"])
        _until_served_from_cache(live_am, agent)
        _set_by_hand(agent.agent.id, "enabled", False)
        response = _until_status(live_am, agent.token, 401)
        assert response.status_code == 401 and "disabled" in response.json()["detail"]
        _set_by_hand(agent.agent.id, "enabled", True)
        assert _until_status(live_am, agent.token, 200).status_code == 200

    def test_a_rotated_token_is_refused_by_the_server_and_the_new_one_accepted(self, live_am, make_agent):
        agent = make_agent("rotated", ["developer"])
        _until_served_from_cache(live_am, agent)
        token = agent_registry.agent_rotate_token(agent=agent.agent)
        response = _until_status(live_am, agent.token, 401)
        assert response.status_code == 401 and "Unknown token" in response.json()["detail"]
        assert _me(live_am, token).json()["id"] == str(agent.agent.id)
