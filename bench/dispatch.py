"""Dispatch: pull + report round trips per second through the HTTP API, against the floor and an alternative.

Side by side on the same PostgreSQL, at 1, 8 and 32 concurrent clients:
- the HTTP API (GET /v1/tasks/{role}/ready, then POST /v1/report_result), under
  daphne, gunicorn with uvicorn workers (ASGI) and gunicorn with threads (WSGI);
- the web stack's ceiling on each server: one-statement DRF views with no auth
  (bench/bare_urls.py), with AgentManager's settings and middleware;
- the raw-SQL floor: the same claim (FOR UPDATE SKIP LOCKED) and completion,
  done directly with psycopg on a table of the same shape (coordination_step);
- procrastinate, a PostgreSQL job queue, deferring and running empty jobs.

    python bench/dispatch.py [--seconds 6] [--clients 1,8,32] [--servers daphne,gunicorn-uvicorn,gunicorn-gthread]
"""

from __future__ import annotations

import argparse
import time

from _harness import emit, fresh_database, pull_and_report, run_clients, say, server, table

CONCURRENCY = [1, 8, 32]


def seed_steps(count: int) -> None:
    from coordination.services import workflow_creation, workflow_specs

    per = 5000
    for offset in range(0, count, per):
        n = min(per, count - offset)
        workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(
            name=f"bench {offset}",
            steps=tuple(workflow_specs.StepSpec(key=f"s{i}", name="x", role="bench") for i in range(n)),
        ))


def http_round_trips(url: str, tokens: list[str], clients: int, seconds: float) -> tuple[float, int]:
    import httpx

    done = [0] * clients

    def client(index: int, stop, errors: list[str]) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[index]}"}, timeout=30) as http:
            while not stop.is_set():
                _pulled, error = pull_and_report(http)
                if error:
                    errors.append(error)
                    return
                done[index] += 1

    elapsed = run_clients(client, clients, seconds, "HTTP clients")
    return sum(done) / elapsed, sum(done)


def bare_setup(params: dict, rows: int) -> None:
    import psycopg

    with psycopg.connect(dbname="am_bench", autocommit=True, **params) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_bare_step")
        conn.execute("CREATE TABLE bench_bare_step (id bigserial PRIMARY KEY, status text NOT NULL, "
                     "attempt int NOT NULL DEFAULT 0)")
        conn.execute("CREATE INDEX bench_bare_ready ON bench_bare_step (id) WHERE status = 'ready'")
        conn.execute("INSERT INTO bench_bare_step (status) SELECT 'ready' FROM generate_series(1, %s)", [rows])
        conn.execute("ANALYZE bench_bare_step")


def bare_round_trips(url: str, clients: int, seconds: float) -> tuple[float, int]:
    """The web stack's ceiling: the same client loop against one-statement views with no auth."""
    import httpx

    done = [0] * clients

    def client(index: int, stop, errors: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                claimed = http.get("/bare/claim")
                if claimed.status_code != 200:
                    errors.append(f"claim {claimed.status_code}")
                    return
                completed = http.post("/bare/complete", json={"id": claimed.json()["id"]})
                if completed.status_code != 200:
                    errors.append(f"complete {completed.status_code}")
                    return
                done[index] += 1

    elapsed = run_clients(client, clients, seconds, "bare clients")
    return sum(done) / elapsed, sum(done)


RAW_TABLE = "bench_raw_step"


def raw_setup(params: dict, rows: int) -> None:
    import psycopg

    with psycopg.connect(dbname="am_bench", autocommit=True, **params) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        conn.execute(f"CREATE TABLE {RAW_TABLE} (LIKE coordination_step INCLUDING ALL)")
        workflow_id = conn.execute("SELECT id FROM coordination_workflow LIMIT 1").fetchone()[0]
        conn.execute(
            f"""INSERT INTO {RAW_TABLE} (id, workflow_id, key, name, description, role, status, priority,
                workflow_priority, attempt, max_attempts, lease_ttl_s, remaining_deps, files, extra_inputs,
                final_result, outputs, error, available_at, lease_token_hash, attempts_released,
                created_at, updated_at)
            SELECT gen_random_uuid(), %s, 'r' || g, 'x', '', 'bench', 'ready', 0, 0, 0, 3, 120, 0, '[]', '{{}}',
                   '', '{{}}', '', now(), '', 0, now(), now()
            FROM generate_series(1, %s) g""",
            [workflow_id, rows],
        )
        conn.execute(f"ANALYZE {RAW_TABLE}")


def raw_round_trips(params: dict, clients: int, seconds: float) -> tuple[float, int]:
    """The floor: claim with SKIP LOCKED and complete, one transaction each, no HTTP, no ORM."""
    import uuid

    import psycopg

    done = [0] * clients
    claim = f"""UPDATE {RAW_TABLE} SET status = 'in_progress', attempt = attempt + 1, lease_agent_id = %s,
                   lease_token_hash = 'x', lease_expires_at = now() + interval '2 minutes'
               WHERE id = (SELECT id FROM {RAW_TABLE} WHERE status = 'ready' AND role = 'bench'
                           AND available_at <= now()
                           ORDER BY workflow_priority DESC, priority DESC, available_at
                           LIMIT 1 FOR UPDATE SKIP LOCKED)
               RETURNING id"""
    complete = f"UPDATE {RAW_TABLE} SET status = 'completed', final_result = 'ok', finished_at = now() WHERE id = %s"

    def client(index: int, stop, errors: list[str]) -> None:
        agent = uuid.uuid4()
        with psycopg.connect(dbname="am_bench", **params) as conn:
            while not stop.is_set():
                row = conn.execute(claim, [agent]).fetchone()
                conn.commit()
                if row is None:
                    errors.append("the raw table ran out of ready rows")
                    return
                conn.execute(complete, [row[0]])
                conn.commit()
                done[index] += 1

    elapsed = run_clients(client, clients, seconds, "raw SQL clients")
    return sum(done) / elapsed, sum(done)


def procrastinate_rate(url: str, jobs: int, concurrency: int) -> tuple[float, float]:
    """Defer `jobs` empty jobs, then run them with `concurrency`; return (jobs/s overall, jobs/s running)."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop", queue="bench")
    def noop() -> None:
        return None

    with app.open():
        started = time.monotonic()
        for offset in range(0, jobs, 500):
            noop.batch_defer(*([{}] * min(500, jobs - offset)))
        deferred = time.monotonic()
        app.run_worker(queues=["bench"], concurrency=concurrency, wait=False, install_signal_handlers=False,
                       listen_notify=False)
    finished = time.monotonic()
    return jobs / (finished - started), jobs / (finished - deferred)


def procrastinate_setup(url: str) -> None:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    with app.open():
        app.schema_manager.apply_schema()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--servers", default="daphne,gunicorn-uvicorn,gunicorn-gthread")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--jobs", type=int, default=3000, help="procrastinate jobs per concurrency level")
    args = parser.parse_args()
    global CONCURRENCY
    CONCURRENCY = [int(n) for n in args.clients.split(",")]
    url, params = fresh_database()

    from coordination.services import agent_registry

    servers = [s for s in args.servers.split(",") if s]
    expected = int(600 * args.seconds * len(CONCURRENCY) * len(servers)) + 2000
    say(f"seeding {expected} ready steps")
    seed_steps(expected)
    tokens = [agent_registry.agent_create(name=f"bench-{i}", roles=["bench"])[1] for i in range(max(CONCURRENCY))]

    results: dict = {"http": {}, "bare": {}, "raw_sql": {}, "procrastinate": {}}
    bare_setup(params, expected)
    for kind in servers:
        with server(kind) as (base, _process):
            http_round_trips(base, tokens, 2, 1.0)  # warm up connections and code paths
            for clients in CONCURRENCY:
                rate, count = http_round_trips(base, tokens, clients, args.seconds)
                results["http"].setdefault(kind, {})[clients] = round(rate, 1)
                say(f"{kind} x{clients}: {rate:.0f} round trips/s ({count})")
        with server(kind, bare=True) as (base, _process):
            bare_round_trips(base, 2, 1.0)
            for clients in CONCURRENCY:
                rate, count = bare_round_trips(base, clients, args.seconds)
                results["bare"].setdefault(kind, {})[clients] = round(rate, 1)
                say(f"{kind} bare views x{clients}: {rate:.0f} round trips/s ({count})")

    raw_setup(params, int(6000 * args.seconds * len(CONCURRENCY)) + 10000)
    for clients in CONCURRENCY:
        rate, count = raw_round_trips(params, clients, args.seconds)
        results["raw_sql"][clients] = round(rate, 1)
        say(f"raw SQL x{clients}: {rate:.0f} round trips/s ({count})")

    try:
        procrastinate_setup(url)
        for clients in CONCURRENCY:
            overall, running = procrastinate_rate(url, args.jobs, clients)
            results["procrastinate"][clients] = {"defer_and_run": round(overall, 1), "run": round(running, 1)}
            say(f"procrastinate x{clients}: {overall:.0f} jobs/s deferred and run ({running:.0f}/s running)")
    except Exception as exc:  # noqa: BLE001 - report the comparison as missing, with why
        results["procrastinate"] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"procrastinate could not run: {exc}")

    rows = []
    for clients in CONCURRENCY:
        floor = results["raw_sql"][clients]
        row = [clients, floor]
        for kind in servers:
            rate = results["http"][kind][clients]
            bare = results["bare"][kind][clients]
            row += [rate, f"{rate / floor:.3f}", bare, f"{rate / bare:.2f}"]
        proc = results["procrastinate"].get(clients) if isinstance(results["procrastinate"], dict) else None
        row.append(proc["defer_and_run"] if isinstance(proc, dict) else "n/a")
        rows.append(row)
    header = ["clients", "raw SQL/s"]
    for kind in servers:
        header += [f"{kind}/s", "/raw", "bare/s", "/bare"]
    header.append("procrastinate/s")
    table("Dispatch: pull + report round trips per second", header, rows)
    # The targets are stated at 8 clients; with other --clients, the summary uses the middle level.
    at = 8 if 8 in CONCURRENCY else CONCURRENCY[len(CONCURRENCY) // 2]
    best = max(servers, key=lambda kind: results["http"][kind][at])
    ratio = results["http"][best][at] / results["raw_sql"][at]
    proc = results["procrastinate"].get(at) if isinstance(results["procrastinate"], dict) else None
    results["summary"] = {
        "clients": at,
        "best_server": best,
        "ratio_to_raw_sql": round(ratio, 3),
        "target_ratio": 0.25,
        "meets_ratio_target": ratio >= 0.25,
        "ratio_to_bare_views": round(results["http"][best][at] / results["bare"][best][at], 3),
        "faster_than_procrastinate": bool(isinstance(proc, dict)
                                          and results["http"][best][at] > proc["defer_and_run"]),
    }
    emit({"benchmark": "dispatch", "seconds": args.seconds, **results})


if __name__ == "__main__":
    main()
