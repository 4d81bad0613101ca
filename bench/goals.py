"""The dispatch goals of issue 15, each measured against its reference in the same run, with whether it is met.

On the worker API server as `make run` serves it (gunicorn with threads), on one
fresh PostgreSQL database:
1. pull + report at 8 clients, against the bare-view ceiling of the same server
   (bench/bare_urls.py: two one-statement DRF views, no auth);
2. batch pulls (`?max=8`, capacity 8, reports as they finish) at 8 clients, in
   steps per second, against procrastinate's jobs per second in the same run;
3. lock acquire + release (one path each, uncontended) at 8 clients, against the
   same bare-view ceiling (two requests a cycle, as there);
4. one workflow worked by 32 agents, against the same 32 agents each on a workflow
   of its own; backends waiting on a lock are sampled meanwhile, those waiting on a workflow row apart (the goal: none);
5. dispatch latency: from the start of a report that releases a step to the moment
   a long-polling agent of that role holds its lease, with 1 and 32 agents waiting;
6. an agent's usage (`GET /v1/agents/me`) with 10 and with 1,000,000 results.

    python bench/goals.py [--seconds 5] [--samples 200] [--history 1000000]
"""

from __future__ import annotations

import argparse
import threading
import time

from _harness import emit, fresh_database, percentile, run_clients, say, server, table

SERVER = "gunicorn-gthread"


def seed(role: str, steps: int, *, per_workflow: int = 5000, name: str = "") -> list:
    from coordination.services import workflow_creation, workflow_specs

    workflows = []
    for offset in range(0, steps, per_workflow):
        n = min(per_workflow, steps - offset)
        workflows.append(workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(
            name=f"{name or role} {offset}",
            steps=tuple(workflow_specs.StepSpec(key=f"s{i}", name="x", role=role) for i in range(n)),
        )))
    return workflows


def agents(prefix: str, count: int, roles, capacity: int = 1) -> list[str]:
    from coordination.services import agent_registry

    return [agent_registry.agent_create(name=f"{prefix}-{i}", roles=roles(i) if callable(roles) else roles,
                                        capacity=capacity)[1] for i in range(count)]


def cycles(url: str, tokens: list[str], seconds: float, role, *, batch: int = 0) -> float:
    """Pull + report cycles per second (steps reported per second), each client an agent of its own."""
    import httpx

    done = [0] * len(tokens)

    def client(index: int, stop, errors: list[str]) -> None:
        own_role = role(index) if callable(role) else role
        held: list[dict] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[index]}"}, timeout=30) as http:
            while not stop.is_set():
                if not batch or len(held) < batch:
                    free = batch - len(held)
                    pulled = http.get(f"/v1/tasks/{own_role}/ready", params={"max": free} if batch else None)
                    if pulled.status_code == 200:
                        body = pulled.json()
                        held.extend(body["leases"] if batch else [body])
                    elif pulled.status_code != 204 or not held:
                        errors.append(f"pull {pulled.status_code} {pulled.text[:200]}")
                        return
                lease = held.pop(0)
                reported = http.post("/v1/report_result", json={
                    "step_id": lease["step"]["id"], "lease_token": lease["lease"]["token"], "status": "completed"})
                if reported.status_code != 200:
                    errors.append(f"report {reported.status_code} {reported.text[:200]}")
                    return
                done[index] += 1

    elapsed = run_clients(client, len(tokens), seconds, f"{role if isinstance(role, str) else 'own-role'} clients")
    return sum(done) / elapsed


# Each sample: whether a backend of the bench database waits on a lock; whether one waits on a workflow row (it
# holds or waits for a tuple lock of coordination_workflow while waiting: the first waiter on a row holds the
# row's tuple lock and waits for its holder's transaction, the next ones wait for the tuple lock; PostgreSQL
# skips the tuple lock only when a transaction upgrades a row lock it already shares, or follows an update
# chain); what the waiters wait for (`transactionid` behind a row or an insert, `tuple`, `extend`, ...); and the
# statements that wait, so that a wait the tuple-lock test misses still shows.
_LOCK_WAITS_SQL = """
WITH waiting AS (
    SELECT pid, wait_event, left(regexp_replace(query, '\\s+', ' ', 'g'), 70) AS query
    FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
)
SELECT (SELECT count(*) FROM waiting),
       (SELECT count(*) FROM pg_locks l JOIN waiting w ON w.pid = l.pid
        WHERE l.locktype = 'tuple' AND l.relation = 'coordination_workflow'::regclass),
       (SELECT coalesce(array_agg(DISTINCT wait_event), '{}') FROM waiting),
       (SELECT coalesce(array_agg(DISTINCT query), '{}') FROM waiting)
"""


def lock_waits_during(work) -> tuple[object, dict]:
    """Run `work()`, sampling every 5 ms which backends of the bench database wait on a lock (`_LOCK_WAITS_SQL`).

    Returns (work's result, {"samples", "any": samples with a waiter, "workflow_row": samples with a waiter on a
    workflow row, "events": {wait event: samples}, "statements": {waiting statement's start: samples}})."""
    import psycopg
    from django.db import connection

    settings = connection.settings_dict
    stop = threading.Event()
    seen = {"samples": 0, "any": 0, "workflow_row": 0, "events": {}, "statements": {}}

    def sampler() -> None:
        with psycopg.connect(dbname=settings["NAME"], host=settings["HOST"], port=settings["PORT"],
                             user=settings["USER"], password=settings["PASSWORD"] or None, autocommit=True) as conn:
            while not stop.is_set():
                waiting, on_workflow, events, statements = conn.execute(_LOCK_WAITS_SQL).fetchone()
                seen["samples"] += 1
                seen["any"] += bool(waiting)
                seen["workflow_row"] += bool(on_workflow)
                for key, found in (("events", events), ("statements", statements)):
                    for item in found:
                        seen[key][item] = seen[key].get(item, 0) + 1
                time.sleep(0.005)

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        result = work()
    finally:
        stop.set()
        thread.join()
    return result, seen


def dispatch_latency(url: str, driver: str, waiters: list[str], samples: int) -> list[float]:
    """Seconds from the start of the driver's report (which releases a `lat` step) to a waiter holding it."""
    import httpx

    started_at = [0.0]
    latencies: list[float] = []
    got = threading.Event()
    stop = threading.Event()
    errors: list[str] = []

    def waiter(token: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            while not stop.is_set():
                pulled = http.get("/v1/tasks/lat/ready", params={"wait": 2})
                if pulled.status_code == 204:
                    continue
                if pulled.status_code != 200:
                    errors.append(f"waiter pull {pulled.status_code}")
                    return
                latencies.append(time.perf_counter() - started_at[0])
                body = pulled.json()
                http.post("/v1/report_result", json={"step_id": body["step"]["id"],
                                                     "lease_token": body["lease"]["token"], "status": "completed"})
                got.set()

    threads = [threading.Thread(target=waiter, args=(token,)) for token in waiters]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # every waiter in its long-poll
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {driver}"}, timeout=30) as http:
        for _ in range(samples):
            pulled = http.get("/v1/tasks/drive/ready")
            if pulled.status_code != 200:
                errors.append(f"driver pull {pulled.status_code}")
                break
            body = pulled.json()
            got.clear()
            started_at[0] = time.perf_counter()
            http.post("/v1/report_result", json={"step_id": body["step"]["id"], "lease_token": body["lease"]["token"],
                                                 "status": "completed"})
            if not got.wait(10):
                errors.append("no waiter got the released step within 10 s")
                break
            time.sleep(0.03)  # the waiter that had it is back in its long-poll
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"dispatch latency failed: {errors[:3]}")
    return latencies


def seed_history(agent_name: str, results: int) -> None:
    """`results` finished steps with their attempts and results, all reported by one agent, in SQL."""
    from django.db import connection

    from coordination.models import Agent, Workflow
    from coordination.tests.history import write_finished_steps

    agent = Agent.objects.get(name=agent_name)
    workflow = Workflow.objects.order_by("created_at").first()
    chunk = 100_000
    for offset in range(0, results, chunk):
        n = min(chunk, results - offset)
        with connection.cursor() as cursor:
            write_finished_steps(cursor, workflow_id=workflow.id, agent_id=agent.id, n=n, role="history",
                                 offset=offset)
        say(f"history: {offset + n:,} of {results:,} results")
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE coordination_result")
        cursor.execute("VACUUM ANALYZE coordination_attempt")
        cursor.execute("VACUUM ANALYZE coordination_step")


def usage_latency(url: str, token: str, requests: int) -> tuple[float, float]:
    """p50 of `GET /v1/agents/me` in ms: on the client's clock and on the server's (Server-Timing)."""
    import httpx

    client_ms, server_ms = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        for _ in range(20):
            http.get("/v1/agents/me")
        for _ in range(requests):
            started = time.perf_counter()
            response = http.get("/v1/agents/me")
            client_ms.append((time.perf_counter() - started) * 1000)
            timing = response.headers.get("Server-Timing", "")
            if "dur=" in timing:
                server_ms.append(float(timing.split("dur=")[1].split(",")[0].split(";")[0]))
    return percentile(client_ms, 50), percentile(server_ms, 50)


def bare_ceiling(seconds: float) -> float:
    """Round trips per second of the bare views (bench/bare_urls.py) at 8 clients, on the same server."""
    import dispatch

    with server(SERVER, bare=True) as (base, _process):
        dispatch.bare_round_trips(base, 8, 1.0)  # warm up, as AgentManager's server is
        return dispatch.bare_round_trips(base, 8, seconds)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=200, help="dispatch latency samples per waiting level")
    parser.add_argument("--history", type=int, default=1_000_000, help="results of the agent with a long history")
    parser.add_argument("--jobs", type=int, default=3000, help="procrastinate jobs")
    args = parser.parse_args()
    url, params = fresh_database()

    import dispatch

    s = args.seconds
    say("seeding steps")
    seed("bench", int(1500 * s) + 3000)
    seed("batch", int(3000 * s) + 5000)
    seed("one", int(600 * s) + 3000, per_workflow=100_000)
    per_agent = int(600 * s / 32) + 100
    for i in range(32):
        seed(f"many-{i}", per_agent, name=f"many {i}")
    for i in range(2 * args.samples + 10):
        from coordination.services import workflow_creation, workflow_specs

        workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(name=f"latency {i}", steps=(
            workflow_specs.StepSpec(key="A", name="drive", role="drive"),
            workflow_specs.StepSpec(key="B", name="released", role="lat", depends_on=("A",)))))
    singles = agents("single", 8, ["bench"])
    batchers = agents("batcher", 8, ["batch"], capacity=8)
    lockers = agents("locker", 8, ["bench"])
    ones = agents("one", 32, ["one"])
    manys = agents("many", 32, lambda i: [f"many-{i}"])
    driver = agents("driver", 1, ["drive"])[0]
    waiters = agents("waiter", 32, ["lat"])
    fresh_agent = agents("fresh", 1, ["bench"])[0]
    veteran = agents("veteran", 1, ["history"])[0]
    dispatch.bare_setup(params, 2 * int(3000 * s) + 5000)  # two runs of the ceiling

    results: dict = {}
    import locks as lock_bench

    # The bare-view ceiling moves by up to 40% between minutes on this shared machine: it is measured before
    # AgentManager's figures and after them, and the mean is the reference (both are printed).
    bare_runs = [bare_ceiling(s)]
    with server(SERVER) as (base, _process):
        cycles(base, singles, 1.0, "bench")  # warm up: every worker process has served requests
        results["pull_report_8"] = cycles(base, singles, s, "bench")
        say(f"pull+report x8: {results['pull_report_8']:.0f}/s")
        results["batch_8"] = cycles(base, batchers, s, "batch", batch=8)
        say(f"batch pull max=8 x8: {results['batch_8']:.0f} steps/s")
        results["locks_8"] = lock_bench.run(base, lockers, s, "uncontended")["cycles_per_s"]
        say(f"lock acquire+release x8: {results['locks_8']:.0f}/s")
        for key, agents_, role, label in (("many_workflows_32", manys, lambda i: f"many-{i}", "32 workflows"),
                                          ("one_workflow_32", ones, "one", "one workflow")):
            rate, waits = lock_waits_during(lambda: cycles(base, agents_, s, role))
            results[key] = {"rate": rate, "samples": waits["samples"], "lock_wait_samples": waits["any"],
                            "workflow_row_wait_samples": waits["workflow_row"], "wait_events": waits["events"],
                            "waiting_statements": waits["statements"]}
            say(f"32 agents on {label}: {rate:.0f}/s; of {waits['samples']} samples, {waits['any']} with a lock "
                f"wait ({waits['events']}; {waits['statements']}), {waits['workflow_row']} on a workflow row")
        for count in (1, 32):
            latencies = dispatch_latency(base, driver, waiters[:count], args.samples)
            results[f"latency_{count}"] = {"p50_ms": round(percentile(latencies, 50) * 1000, 1),
                                           "p99_ms": round(percentile(latencies, 99) * 1000, 1)}
            say(f"dispatch latency, {count} waiting: {results[f'latency_{count}']}")
    # The fresh agent gets 10 results through the API, the veteran a long history straight in the tables.
    with server(SERVER) as (base, _process):
        import httpx

        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {fresh_agent}"}) as http:
            for _ in range(10):
                body = http.get("/v1/tasks/bench/ready").json()
                http.post("/v1/report_result", json={"step_id": body["step"]["id"],
                                                     "lease_token": body["lease"]["token"], "status": "completed",
                                                     "usage": {"model": "m", "prompt_tokens": 1,
                                                               "completion_tokens": 1, "cost_usd": 0.01}})
        seed_history("veteran-0", args.history)
        results["usage_10"] = usage_latency(base, fresh_agent, 300)
        results["usage_history"] = usage_latency(base, veteran, 300)
        say(f"agents/me p50 (client, server ms): 10 results {results['usage_10']}, "
            f"{args.history:,} results {results['usage_history']}")
    bare_runs.append(bare_ceiling(s))
    results["bare_8_runs"] = bare_runs
    results["bare_8"] = sum(bare_runs) / len(bare_runs)
    say(f"bare views x8: {results['bare_8']:.0f}/s (before {bare_runs[0]:.0f}, after {bare_runs[1]:.0f})")
    try:
        dispatch.procrastinate_setup(url)
        overall, running = dispatch.procrastinate_rate(url, args.jobs, 8)
        results["procrastinate_8"] = {"defer_and_run": overall, "run": running}
        say(f"procrastinate x8: {overall:.0f} jobs/s deferred and run, {running:.0f}/s running")
    except Exception as exc:  # noqa: BLE001 - the comparison is reported as missing, with why
        results["procrastinate_8"] = {"error": f"{type(exc).__name__}: {exc}"}

    bare = results["bare_8"]
    proc = results["procrastinate_8"].get("defer_and_run")
    many = results["many_workflows_32"]
    one = results["one_workflow_32"]
    u10, uh = results["usage_10"], results["usage_history"]
    goals = [
        ("pull+report, 8 clients", f"{results['pull_report_8']:.0f}/s", f"bare views {bare:.0f}/s (mean of {bare_runs[0]:.0f}, {bare_runs[1]:.0f})",
         results["pull_report_8"] / bare, ">= 0.6", results["pull_report_8"] / bare >= 0.6),
        ("batch pull max=8, 8 clients", f"{results['batch_8']:.0f} steps/s",
         f"procrastinate {proc:.0f} jobs/s" if proc else "procrastinate n/a",
         results["batch_8"] / proc if proc else float("nan"), ">= 1.0", bool(proc) and results["batch_8"] >= proc),
        ("lock acquire+release, 8 clients", f"{results['locks_8']:.0f}/s", f"bare views {bare:.0f}/s (mean of {bare_runs[0]:.0f}, {bare_runs[1]:.0f})",
         results["locks_8"] / bare, ">= 0.6", results["locks_8"] / bare >= 0.6),
        ("32 agents on one workflow",
         f"{one['rate']:.0f}/s, workflow-row waits {one['workflow_row_wait_samples']}/{one['samples']} "
         f"(any lock {one['lock_wait_samples']})",
         f"32 workflows {many['rate']:.0f}/s (any lock {many['lock_wait_samples']}/{many['samples']})",
         one["rate"] / many["rate"], ">= 0.8, no row waits",
         one["rate"] / many["rate"] >= 0.8 and one["workflow_row_wait_samples"] == 0),
        ("dispatch latency, 1 waiting", f"p50 {results['latency_1']['p50_ms']} ms, p99 {results['latency_1']['p99_ms']} ms",
         "", float("nan"), "", True),
        ("dispatch latency, 32 waiting",
         f"p50 {results['latency_32']['p50_ms']} ms, p99 {results['latency_32']['p99_ms']} ms", "",
         float("nan"), "p99 < 50 ms", results["latency_32"]["p99_ms"] < 50),
        (f"usage with {args.history:,} results", f"p50 {uh[1]:.2f} ms (server), {uh[0]:.2f} ms (client)",
         f"10 results {u10[1]:.2f} ms (server)", uh[1] / u10[1], "<= 1.2", uh[1] / u10[1] <= 1.2),
    ]
    table(f"Issue 15 goals ({SERVER}, {args.seconds:g} s per figure)",
          ["goal", "figure", "reference", "ratio", "target", "met"],
          [[name, figure, reference, "" if ratio != ratio else f"{ratio:.2f}", target, "yes" if met else "NO"]
           for name, figure, reference, ratio, target, met in goals])
    results["goals"] = {name: {"ratio": None if ratio != ratio else round(ratio, 3), "met": bool(met)}
                        for name, _figure, _reference, ratio, _target, met in goals}
    emit({"benchmark": "goals", "seconds": args.seconds, "server": SERVER, **results})


if __name__ == "__main__":
    main()
