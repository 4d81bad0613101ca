"""Failure drills: break a running deployment on purpose and check that nothing is lost.

Each drill starts its own deployment (drills/_cluster.py: private PostgreSQL
and Redis, the worker API server, Celery, scripted agents as real processes),
breaks it as users' deployments break, and checks the tables afterwards.
Prints what was broken and what held, a summary table, and as its last line one
JSON object; exits 1 if any drill failed.

    python drills/run.py [--only kills,restart,postgres,redis,paused,scale_out] [--keep]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import traceback

from _cluster import Cluster, exactly_once_report, free_port, rng, say, wait_until

DRILLS = {}


def drill(name: str):
    def register(function):
        DRILLS[name] = function
        return function

    return register


def _workflow(name: str, steps: int, *, roles=("developer", "tester"), layer: int = 0, lease_ttl_s: int = 4,
              max_attempts: int = 20, files: bool = False):
    """`steps` steps over `roles`; with `layer`, step i depends on step i - layer (a DAG that opens as it goes)."""
    from coordination.services import workflow_creation, workflow_specs

    specs = []
    for i in range(steps):
        deps = (f"s{i - layer}",) if layer and i >= layer else ()
        file_specs = (workflow_specs.FileSpec(path=f"out/s{i}.txt", mode="write"),) if files else ()
        specs.append(workflow_specs.StepSpec(key=f"s{i}", name=f"step {i}", role=roles[i % len(roles)], depends_on=deps,
                                       lease_ttl_s=lease_ttl_s, files=file_specs))
    return workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(name=name, steps=tuple(specs),
                                                              max_attempts=max_attempts))


def _agents(count: int, roles=("developer", "tester"), capacity: int = 2, prefix: str = "agent"):
    from coordination.services import agent_registry

    return [(f"{prefix}-{i}", agent_registry.agent_create(name=f"{prefix}-{i}", roles=list(roles), capacity=capacity)[1])
            for i in range(count)]


def _status(workflow_id) -> str:
    from coordination.models import Workflow

    return Workflow.objects.values_list("status", flat=True).get(id=workflow_id)


def _completed(workflow_id) -> int:
    from coordination.models import Workflow

    return Workflow.objects.get(id=workflow_id).n_completed  # an instance: its counters are live


def _wait_finished(workflow_id, timeout: float, progress_every: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    shown = time.monotonic()
    while time.monotonic() < deadline:
        status = _status(workflow_id)
        if status not in ("running", "paused", "planning"):
            return status
        if time.monotonic() - shown > progress_every:
            say(f"  ... {_completed(workflow_id)} steps completed")
            shown = time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"the workflow did not finish within {timeout:.0f} s ({_completed(workflow_id)} completed)")


def _check_exactly_once(workflow_id, steps: int) -> dict:
    report = exactly_once_report(workflow_id)
    problems = []
    if report["workflow_status"] != "completed":
        problems.append(f"workflow is {report['workflow_status']}")
    if report["completed"] != steps:
        problems.append(f"{report['completed']} of {steps} steps completed")
    if report["steps_with_result_applied_twice"] or report["steps_with_completed_event_twice"]:
        problems.append("a result was applied twice")
    if report["steps_with_completed_result"] != steps:
        problems.append(f"{report['steps_with_completed_result']} steps have a completed result")
    if not report["final_result_matches"]:
        problems.append("a step's final result differs from its applied result")
    if problems:
        raise AssertionError("; ".join(problems) + f" ({report})")
    return report


# --- the drills ---------------------------------------------------------------


@drill("kills")
def agents_killed(cluster: Cluster, steps: int = 500) -> dict:
    """Agents SIGKILLed mid-step at random during a 500-step run; each is replaced, as a supervisor would."""
    api = cluster.api_server()
    cluster.celery()
    workflow = _workflow("kills", steps, layer=25)
    agents = _agents(6)
    running = {name: cluster.agent(name, token, api, concurrency=2, delay_s=0.05) for name, token in agents}
    tokens = dict(agents)
    kills = 0
    started = time.monotonic()
    while _status(workflow.id) == "running" and time.monotonic() - started < 600:
        time.sleep(rng.uniform(0.3, 1.2))
        name = rng.choice(sorted(running))
        cluster.stop_process(running[name], signal.SIGKILL)
        kills += 1
        running[name] = cluster.agent(name, tokens[name], api, concurrency=2, delay_s=0.05)
        if kills % 25 == 0:
            say(f"  {kills} agents killed, {_completed(workflow.id)} of {steps} steps completed")
    _wait_finished(workflow.id, 120)
    report = _check_exactly_once(workflow.id, steps)
    if report["attempts_expired"] == 0:
        raise AssertionError("no lease expired: the kills did not hit a step mid-work")
    return {"broken": f"{kills} agents SIGKILLed at random (and restarted) over {time.monotonic() - started:.0f} s",
            "held": f"all {steps} steps completed exactly once; {report['attempts_expired']} leases of killed "
                    f"agents expired and their steps were redone; {report['attempts']} attempts in all",
            **report}


@drill("restart")
def web_server_restarted(cluster: Cluster, steps: int = 200) -> dict:
    """The worker API server restarted mid-run: killed outright once, stopped gracefully once."""
    port = free_port()
    api = cluster.api_server(port)
    cluster.celery()
    workflow = _workflow("restart", steps, layer=10, lease_ttl_s=30)
    for name, token in _agents(4):
        cluster.agent(name, token, api, concurrency=2, delay_s=0.05)
    restarts = []
    for fraction, sig in ((0.3, signal.SIGKILL), (0.6, signal.SIGTERM)):
        wait_until(lambda: _completed(workflow.id) >= steps * fraction, 300, f"{fraction:.0%} of the steps")
        server = [p for n, p in cluster.processes if n == "api" and p.poll() is None][0]
        down = time.monotonic()
        cluster.stop_process(server, sig)
        time.sleep(2.0)
        cluster.api_server(port)
        restarts.append(f"{signal.Signals(sig).name} at {_completed(workflow.id)} steps, "
                        f"back after {time.monotonic() - down:.1f} s")
    _wait_finished(workflow.id, 300)
    report = _check_exactly_once(workflow.id, steps)
    return {"broken": "API server " + "; ".join(restarts),
            "held": f"agents retried through the outages; all {steps} steps completed exactly once", **report}


@drill("postgres")
def postgres_stopped(cluster: Cluster, steps: int = 8, outage_s: float = 12.0) -> dict:
    """PostgreSQL stopped for a while with steps in progress."""
    import httpx

    api = cluster.api_server()
    mcp_server = cluster.daphne()
    cluster.celery()
    workflow = _workflow("postgres", steps, lease_ttl_s=90)
    agents = _agents(4, capacity=2)
    for name, token in agents:
        cluster.agent(name, token, api, delay_s=1.5)

    def in_progress():
        from coordination.models import Workflow

        return Workflow.objects.get(id=workflow.id).n_in_progress >= 2

    wait_until(in_progress, 60, "two steps in progress")
    from coordination.models import Attempt

    leased_before = set(Attempt.objects.filter(step__workflow=workflow).values_list("id", flat=True))
    cluster.stop_postgres()
    stopped_at = time.time()
    say("  PostgreSQL stopped")
    time.sleep(1.0)
    token = agents[0][1]
    asked = time.monotonic()
    during = httpx.get(f"{api}/v1/agents/me", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    api_seconds = time.monotonic() - asked
    health = httpx.get(f"{api}/healthz", timeout=60)
    mcp_during = httpx.post(f"{mcp_server}/mcp", headers={"Authorization": f"Bearer {token}"}, timeout=60, json={
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "drill", "version": "1"}}})
    problems = []
    if mcp_during.status_code != 503 or mcp_during.json().get("error") != "database_unavailable":
        problems.append(f"/mcp answered {mcp_during.status_code} {mcp_during.text[:200]} during the outage")
    if during.status_code != 503 or during.json().get("error") != "database_unavailable":
        problems.append(f"the API answered {during.status_code} {during.text[:200]} during the outage")
    if api_seconds > 15:
        problems.append(f"the API took {api_seconds:.1f} s to answer during the outage")
    if health.status_code != 503 or "PostgreSQL" not in health.json().get("down", []):
        problems.append(f"/healthz answered {health.status_code} {health.text[:200]}")
    time.sleep(max(0.0, outage_s - (time.time() - stopped_at)))
    cluster.start_postgres()
    say("  PostgreSQL started again")
    restarted_at = time.time()
    _wait_finished(workflow.id, 180)
    report = _check_exactly_once(workflow.id, steps)
    from coordination.models import Result

    delivered_later = Result.objects.filter(attempt_id__in=leased_before, status="completed").count()
    if problems:
        raise AssertionError("; ".join(problems))
    if not delivered_later:
        raise AssertionError("no result of a step leased before the outage was delivered after it")
    return {"broken": f"PostgreSQL stopped for {restarted_at - stopped_at:.0f} s with "
                      f"{len(leased_before)} steps leased",
            "held": f"the API and /mcp answered 503 database_unavailable (the API in {api_seconds:.2f} s); "
                    f"/healthz named the "
                    f"database; {delivered_later} results of steps leased before the outage were delivered "
                    f"after it; all {steps} steps completed exactly once",
            "api_503_seconds": round(api_seconds, 2), **report}


@drill("paused")
def paused_process(cluster: Cluster) -> dict:
    """A process that holds a lease and a lock is paused past its lease; it wakes after the step was reassigned."""
    import httpx

    api = cluster.api_server()
    cluster.celery()
    workflow = _workflow("paused", 1, roles=("developer",), lease_ttl_s=3, files=True)
    (sleeper_name, sleeper_token), (helper_name, helper_token) = _agents(2, roles=("developer",), capacity=1)
    sleeper = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {sleeper_token}"}, timeout=30)
    pulled = sleeper.get("/v1/tasks/developer/ready").json()
    step_id, lease = pulled["step"]["id"], pulled["lease"]["token"]
    sleeper_locks = sleeper.get("/v1/locks", params={"agent": sleeper_name}).json()["locks"]
    say(f"  the sleeper holds the step and {len(sleeper_locks)} lock(s), then stops heartbeating")
    helper = cluster.agent(helper_name, helper_token, api, delay_s=0.3)
    _wait_finished(workflow.id, 60)
    report_answer = sleeper.post("/v1/report_result", json={"step_id": step_id, "lease_token": lease,
                                                             "status": "completed", "final_result": "STALE"})
    heartbeat_answer = sleeper.post(f"/v1/steps/{step_id}/heartbeat", json={"lease_token": lease})
    release_answers = [sleeper.delete(f"/v1/locks/{lock['id']}").status_code for lock in sleeper_locks]
    renew_answers = [sleeper.post(f"/v1/locks/{lock['id']}/renew", json={"ttl_s": 60}).status_code
                     for lock in sleeper_locks]
    cluster.stop_process(helper)
    from coordination.models import FileLock, Step

    step = Step.objects.get(id=step_id)
    problems = []
    if report_answer.status_code != 409 or report_answer.json().get("error") != "stale_lease":
        problems.append(f"the stale report got {report_answer.status_code} {report_answer.text[:200]}")
    if heartbeat_answer.status_code != 409:
        problems.append(f"the stale heartbeat got {heartbeat_answer.status_code}")
    if step.final_result == "STALE":
        problems.append("the stale result was applied")
    if not sleeper_locks:
        problems.append("the sleeper held no lock to test fencing with")
    if any(code == 200 for code in renew_answers):
        problems.append(f"a stale lock was renewed: {renew_answers}")
    grants = list(FileLock.objects.filter(path="out/s0.txt").order_by("fencing").values("agent__name", "fencing"))
    if len(grants) < 2 or grants[-1]["fencing"] <= grants[0]["fencing"]:
        problems.append(f"the helper's grant does not carry a higher fencing token: {grants}")
    _check_exactly_once(workflow.id, 1)
    # The same with a real worker process: SIGSTOP past the lease, SIGCONT after the step was redone.
    workflow2 = _workflow("paused-process", 1, roles=("developer",), lease_ttl_s=3)
    (stopped_name, stopped_token), (other_name, other_token) = _agents(2, roles=("developer",), capacity=1,
                                                                       prefix="proc")
    stopped = cluster.agent(stopped_name, stopped_token, api, delay_s=1.0)
    wait_until(lambda: Step.objects.filter(workflow=workflow2, status="in_progress").exists(), 30, "the lease")
    stopped.send_signal(signal.SIGSTOP)
    other = cluster.agent(other_name, other_token, api, delay_s=0.2)
    _wait_finished(workflow2.id, 60)
    stopped.send_signal(signal.SIGCONT)
    time.sleep(6.0)
    cluster.stop_process(other)
    cluster.stop_process(stopped)
    report2 = _check_exactly_once(workflow2.id, 1)
    step2 = Step.objects.get(workflow=workflow2)
    winner = step2.results.get(status="completed").attempt.agent.name
    if winner != other_name:
        problems.append(f"the step's result came from {winner}, not the agent that took it over")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"broken": "a lease holder paused past its lease (by hand, and a worker process by SIGSTOP)",
            "held": f"its report got 409 stale_lease and was not applied, its heartbeat 409, its lock renewals "
                    f"{sorted(set(renew_answers))} and releases {sorted(set(release_answers))} left the new "
                    f"holder's lock (fencing {grants[-1]['fencing']} > {grants[0]['fencing']}) alone; the resumed "
                    f"worker process dropped its work ({report2['stale_reports_refused']} stale reports refused)",
            "stale_report_status": report_answer.status_code, "renew_statuses": renew_answers,
            "release_statuses": release_answers, "fencing": [g["fencing"] for g in grants]}


@drill("redis")
def redis_stopped(cluster: Cluster, steps: int = 12, outage_s: float = 10.0) -> dict:
    """Redis stopped while agents work and a dashboard page is open."""
    import re

    api = cluster.api_server()
    dash = cluster.daphne()
    cluster.celery()
    workflow = _workflow("redis", steps, lease_ttl_s=60)
    socket = cluster.dashboard_socket(dash, f"/ws/workflows/{workflow.id}/")
    agents = _agents(3, capacity=1)
    for name, token in agents:
        cluster.agent(name, token, api, delay_s=0.4)
    wait_until(lambda: _completed(workflow.id) >= 2, 60, "two completed steps")
    wait_until(lambda: 'data-status="completed"' in socket.text(), 10, "a live frame before the outage")
    cluster.stop_redis()
    stopped_at = time.monotonic()
    before = _completed(workflow.id)
    say(f"  Redis stopped at {before} completed steps")
    wait_until(socket.closed, 15, "the page's socket to close (live updates paused)")
    closed_after = time.monotonic() - stopped_at
    if socket.last_close_code() != 4503:
        raise AssertionError(f"the socket closed with {socket.last_close_code()}, not 4503 (layer down)")
    time.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))
    during = _completed(workflow.id)
    cluster.start_redis()
    say(f"  Redis started again; {during - before} steps completed during the outage")
    # The page reconnects and asks for what it missed, as am.js does.
    markers = re.findall(r'id="live-seq" data-seq="(\d+)"', socket.text())  # the page's last marker, as am.js
    last_seen = int(markers[-1]) if markers else 0
    reconnect = wait_until(lambda: _try_reconnect(socket), 30, "the page's socket to reconnect")
    socket.send(json.dumps({"catch_up_after": last_seen}))
    _wait_finished(workflow.id, 120)

    def caught_up():
        from coordination.models import Step

        text = socket.text()
        return all(f'id="step-{sid}" data-status="completed"' in text
                   for sid in Step.objects.filter(workflow=workflow).values_list("id", flat=True))

    wait_until(caught_up, 30, "the page to show every step completed")
    report = _check_exactly_once(workflow.id, steps)
    socket.close()
    if during <= before:
        raise AssertionError("no step completed while Redis was down: pulls and reports stopped")
    return {"broken": f"Redis stopped for {outage_s:.0f} s while 3 agents worked and a dashboard page was open",
            "held": f"{during - before} steps completed during the outage (pull, heartbeat, report need no "
                    f"Redis); the page's socket closed {closed_after:.1f} s in (the page shows 'live updates "
                    f"paused'), reconnected {reconnect} and caught up from the event log; all {steps} steps "
                    f"completed exactly once", "socket_closed_after_s": round(closed_after, 1),
            "completed_during_outage": during - before, **report}


@drill("scale_out")
def scale_out(cluster: Cluster, steps: int = 200) -> dict:
    """Two API servers, two daphnes and two Celery workers on one PostgreSQL and Redis."""
    from django.db.models import Count

    from coordination.models import Attempt, Result, Step

    apis = [cluster.api_server(name="api-a"), cluster.api_server(name="api-b")]
    dashes = [cluster.daphne(name="daphne-a"), cluster.daphne(name="daphne-b")]
    cluster.celery("celery-a", beat=True)
    cluster.celery("celery-b", beat=False)
    workflow = _workflow("scale-out", steps, layer=20, lease_ttl_s=30)
    sockets = [cluster.dashboard_socket(url, f"/ws/workflows/{workflow.id}/") for url in dashes]
    agents = _agents(6)
    for index, (name, token) in enumerate(agents):
        cluster.agent(name, token, apis[index % 2], concurrency=2, delay_s=0.05)
    _wait_finished(workflow.id, 300)
    report = _check_exactly_once(workflow.id, steps)
    twice = Attempt.objects.filter(step__workflow=workflow).values("step").annotate(n=Count("id")).filter(n__gt=1)
    by_server = {server: Result.objects.filter(step__workflow=workflow, attempt__agent__name__in=[
        name for index, (name, _t) in enumerate(agents) if index % 2 == position]).count()
        for position, server in enumerate(("api-a", "api-b"))}
    step_ids = list(Step.objects.filter(workflow=workflow).values_list("id", flat=True))

    def every_step_on(socket):
        text = socket.text()
        return all(f'id="step-{sid}" data-status="completed"' in text for sid in step_ids)

    shown = {}
    for name, socket in zip(("daphne-a", "daphne-b"), sockets):
        try:
            wait_until(lambda: every_step_on(socket), 30, f"{name}'s page to show every step completed")
            shown[name] = True
        except AssertionError:
            shown[name] = False
        socket.close()
    problems = []
    if twice.exists():
        problems.append(f"{twice.count()} steps were leased more than once")
    if min(by_server.values()) == 0:
        problems.append(f"the work did not spread over both servers: {by_server}")
    if not all(shown.values()):
        problems.append(f"a dashboard socket missed events: {shown}")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"broken": "(scaled out) 2 API servers, 2 daphnes, 2 Celery workers; 6 agents, half on each API server",
            "held": f"results through each server {by_server}; every step leased once and completed once; "
                    f"a page on each daphne showed all {steps} completions", "results_by_server": by_server,
            **report}


def _try_reconnect(socket) -> str | None:
    try:
        socket.connect()
        return "after Redis returned"
    except Exception:  # noqa: BLE001 - refused while the layer is still down: the page retries too
        time.sleep(1.0)
        return None


def run_one(name: str, keep: bool) -> dict:
    started = time.monotonic()
    cluster = Cluster(name)
    outcome: dict = {}
    try:
        result = DRILLS[name](cluster)
        outcome = {"passed": True, "seconds": round(time.monotonic() - started), **result}
        say(f"{name}: PASSED - {result['held']}")
    except Exception as exc:  # noqa: BLE001 - a failed drill is reported, the others still run
        traceback.print_exc()
        outcome = {"passed": False, "seconds": round(time.monotonic() - started),
                   "error": f"{type(exc).__name__}: {exc}", "logs": str(cluster.logs)}
        say(f"{name}: FAILED - {exc} (logs: {cluster.logs})")
    finally:
        cluster.close(keep=keep or not outcome.get("passed"))
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated drill names")
    parser.add_argument("--keep", action="store_true", help="keep each drill's directory (logs) afterwards")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one drill in this process (Django set up for it)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.keep), default=str), flush=True)
        return 0
    names = [n for n in args.only.split(",") if n] or list(DRILLS)
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        parser.error(f"unknown drill(s) {unknown}; known: {', '.join(DRILLS)}")
    outcomes = {}
    for name in names:
        say(f"{name}: {DRILLS[name].__doc__}")
        # Each drill in a process of its own: Django is set up once per process, on that drill's database.
        argv = [sys.executable, __file__, "--one", name] + (["--keep"] if args.keep else [])
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        lines = done.stdout.strip().splitlines()
        try:
            outcomes[name] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            outcomes[name] = {"passed": False, "error": f"the drill process exited with {done.returncode} "
                                                        f"and no outcome: {done.stdout[-500:]}"}
    print("\nFailure drills")
    for name, outcome in outcomes.items():
        mark = "PASS" if outcome["passed"] else "FAIL"
        print(f"  {mark}  {name:10} {outcome.get('broken', '')}")
        print(f"        {'':10} {outcome.get('held') or outcome.get('error')}")
    print(json.dumps({"drills": outcomes}, default=str), flush=True)
    return 0 if all(o["passed"] for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
