"""Pull under a large history: pull latency with 32 concurrent pullers, with and without a million finished steps.

Side by side on the same server (the worker API as `make run` serves it) and
database: first with only the ready queue, then after adding `--history`
finished steps to the step table. Each puller pulls (timed), reports, and
waits a random think time (`--think-ms`, mean) before pulling again, as
agents do between steps; the load stays below saturation, so the figures
show what the pull costs rather than the queue in front of a busy CPU. The
pullers run in 4 client processes, niced (`--client-nice`): agents normally
run on other machines, and here they would otherwise take the CPU from the
server and PostgreSQL they are measuring.

    python bench/history.py [--history 1000000] [--pullers 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from _harness import emit, fresh_database, percentile, pull_and_report, run_clients, say, server, table


def seed_ready(count: int, per_workflow: int = 5000) -> None:
    from coordination.services import workflow_creation, workflow_specs

    for offset in range(0, count, per_workflow):
        n = min(per_workflow, count - offset)
        workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(
            name=f"queue {offset}",
            steps=tuple(workflow_specs.StepSpec(key=f"s{i}", name="x", role="bench") for i in range(n)),
        ))


def add_history(params: dict, rows: int) -> float:
    """Add `rows` completed steps (with their attempts) to one finished workflow; return the seconds it took."""
    import psycopg

    started = time.monotonic()
    with psycopg.connect(dbname="am_bench", **params) as conn:
        project_id = conn.execute("SELECT id FROM coordination_project WHERE name = 'default'").fetchone()[0]
        workflow_id = conn.execute(
            """INSERT INTO coordination_workflow (id, project_id, name, goal, status, paused_reason, failure_reason,
                   priority, max_attempts, max_rework_rounds, rework_round, spent_usd, spent_tokens, metadata, synthesis,
                   total_steps, n_pending, n_ready, n_in_progress, n_completed, n_failed, n_cancelled, n_skipped,
                   created_at, updated_at, finished_at)
               VALUES (gen_random_uuid(), %s, 'history', '', 'completed', '', '', 0, 3, 1, 0, 0, 0, '{}', '',
                       %s, 0, 0, 0, %s, 0, 0, 0, now(), now(), now())
               RETURNING id""",
            [project_id, rows, rows],
        ).fetchone()[0]
        done = 0
        batch = 100_000
        while done < rows:
            n = min(batch, rows - done)
            conn.execute(
                """INSERT INTO coordination_step (id, workflow_id, key, name, description, role, status, priority,
                       workflow_priority, attempt, max_attempts, lease_ttl_s, remaining_deps, files, extra_inputs,
                       final_result, outputs, error, available_at, lease_token_hash, attempts_released,
                       created_at, updated_at, started_at, finished_at)
                   SELECT gen_random_uuid(), %s, 'h' || g, 'x', '', 'bench', 'completed', 0, 0, 1, 3, 120, 0, '[]',
                          '{}', 'done', '{}', '', now(), '', 0, now(), now(), now(), now()
                   FROM generate_series(%s, %s) g""",
                [workflow_id, done + 1, done + n],
            )
            conn.commit()
            done += n
            say(f"history: {done:,} of {rows:,} finished steps")
        conn.execute("ANALYZE coordination_step")
        conn.commit()
    return time.monotonic() - started


def _pullers(url: str, tokens: list[str], seconds: float, think_ms: float, nice: int, out) -> None:
    """One process's pullers (threads); puts (client latencies, server latencies, errors) on `out`."""
    import os

    import httpx

    # Agents run on other machines; here they share the two cores with the server and PostgreSQL, so they
    # yield the CPU (nice) rather than stall a server thread that holds the workflow's row.
    os.nice(nice)

    client_s: list[float] = []
    server_ms: list[float] = []
    lock = threading.Lock()

    def puller(index: int, stop, errors: list[str]) -> None:
        rng = random.Random(tokens[index])
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[index]}"}, timeout=30) as http:
            while not stop.is_set():
                started = time.perf_counter()
                pulled, error = pull_and_report(http)
                if error:
                    errors.append(error)
                    return
                with lock:
                    # The pull alone: its own time on the client, and the server's Server-Timing.
                    client_s.append(pulled.elapsed.total_seconds() if pulled.elapsed else time.perf_counter() - started)
                    server_ms.append(float(pulled.headers["Server-Timing"].partition("dur=")[2]))
                time.sleep(rng.expovariate(1000 / think_ms) if think_ms else 0)

    try:
        run_clients(puller, len(tokens), seconds, "pullers")
        out.put((client_s, server_ms, []))
    except RuntimeError as exc:
        out.put((client_s, server_ms, [str(exc)]))


def measure(url: str, tokens: list[str], seconds: float, think_ms: float, processes: int = 4,
            nice: int = 10) -> dict:
    """Pullers spread over `processes` client processes, so the clients' own GIL does not add to the latency."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    groups = [tokens[i::processes] for i in range(processes) if tokens[i::processes]]
    workers = [context.Process(target=_pullers, args=(url, group, seconds, think_ms, nice, out)) for group in groups]
    for worker in workers:
        worker.start()
    client_s: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    for _ in workers:
        c, s, e = out.get(timeout=seconds + 120)
        client_s += c
        server_ms += s
        errors += e
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError(f"pullers failed: {errors[:3]}")
    return {
        "pulls": len(client_s),
        "p50_ms": round(percentile(client_s, 50) * 1000, 1),
        "p99_ms": round(percentile(client_s, 99) * 1000, 1),
        "server_p50_ms": round(percentile(server_ms, 50), 1),
        "server_p99_ms": round(percentile(server_ms, 99), 1),
        "pulls_per_s": round(len(client_s) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--pullers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--think-ms", type=float, default=500.0, help="mean pause between a report and the next pull")
    parser.add_argument("--server", default="gunicorn-gthread")
    parser.add_argument("--per-workflow", type=int, default=5000, help="ready steps per workflow")
    parser.add_argument("--client-nice", type=int, default=10, help="niceness of the client processes (0: none)")
    args = parser.parse_args()
    _url, params = fresh_database()

    from coordination.services import agent_registry

    ready = int(args.pullers * args.seconds * 2 * 1000 / max(args.think_ms, 50)) + 2000
    say(f"seeding {ready:,} ready steps")
    seed_ready(ready, args.per_workflow)
    tokens = [agent_registry.agent_create(name=f"puller-{i}", roles=["bench"])[1] for i in range(args.pullers)]
    results: dict = {}
    with server(args.server) as (base, _process):
        measure(base, tokens, 4.0, args.think_ms, nice=args.client_nice)  # warm up: pools, caches, threads
        results["empty_history"] = measure(base, tokens, args.seconds, args.think_ms, nice=args.client_nice)
        say(f"no history: {results['empty_history']}")
    seconds = add_history(params, args.history)
    say(f"history added in {seconds:.0f} s")
    with server(args.server) as (base, _process):
        measure(base, tokens, 4.0, args.think_ms, nice=args.client_nice)
        results["large_history"] = measure(base, tokens, args.seconds, args.think_ms, nice=args.client_nice)
        say(f"{args.history:,} finished steps: {results['large_history']}")

    rows = [[label, f"{r['pulls']:,}", r["pulls_per_s"], r["p50_ms"], r["p99_ms"], r["server_p50_ms"],
             r["server_p99_ms"]]
            for label, r in (("ready queue only", results["empty_history"]),
                             (f"+ {args.history:,} finished steps", results["large_history"]))]
    table(f"Pull latency, {args.pullers} pullers ({args.server}, think time {args.think_ms:.0f} ms)",
          ["step table", "pulls", "pulls/s", "p50 ms", "p99 ms", "server p50 ms", "server p99 ms"], rows)
    p99 = results["large_history"]["p99_ms"]
    results["summary"] = {
        "p99_ms_under_history": p99, "server_p99_ms_under_history": results["large_history"]["server_p99_ms"],
        "target_p99_ms": 50, "meets_target": p99 < 50,
        "p99_ratio_history_to_empty": round(p99 / results["empty_history"]["p99_ms"], 2),
    }
    emit({"benchmark": "history", "history": args.history, "pullers": args.pullers, "server": args.server, **results})


if __name__ == "__main__":
    main()
