"""Footprint: resident memory of the web server with 200 agents long-polling.

Each server kind is started on the bench database; we read the resident
memory (RSS, the server's whole process tree) idle, then with `--agents`
agents holding `GET /v1/tasks/{role}/ready?wait=30` open on an empty queue, and
check that the server still answers other requests while they wait. The
database connections the server holds at that moment are counted too
(waiting pulls hold none).

    python bench/footprint.py [--agents 200] [--servers gunicorn-gthread,daphne]
"""

from __future__ import annotations

import argparse
import threading
import time

from _harness import emit, fresh_database, say, server, table


def tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def tree_threads(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.num_threads() for p in [root, *root.children(recursive=True)])


def db_connections(params: dict) -> int:
    import psycopg

    with psycopg.connect(dbname="am_bench", autocommit=True, **params) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'am_bench' AND pid <> pg_backend_pid()"
        ).fetchone()[0]


def measure(kind: str, tokens: list[str], params: dict, hold_s: float) -> dict:
    import httpx

    with server(kind) as (base, process):
        with httpx.Client(base_url=base, timeout=10) as http:
            for _ in range(20):
                http.get("/healthz")
        time.sleep(1.0)
        idle = tree_rss_mb(process.pid)
        stop = threading.Event()
        started = threading.Barrier(len(tokens) + 1)
        errors: list[str] = []

        def agent(token: str) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=40) as http:
                started.wait()
                while not stop.is_set():
                    try:
                        response = http.get("/v1/tasks/idle/ready", params={"wait": 30})
                    except httpx.HTTPError as exc:
                        errors.append(f"{type(exc).__name__}")
                        return
                    if response.status_code != 204:
                        errors.append(f"status {response.status_code}")
                        return

        threads = [threading.Thread(target=agent, args=(token,), daemon=True) for token in tokens]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(hold_s)
        loaded = tree_rss_mb(process.pid)
        threads_now = tree_threads(process.pid)
        connections = db_connections(params)
        probe_started = time.perf_counter()
        with httpx.Client(base_url=base, timeout=30) as http:
            health = http.get("/healthz").status_code
        probe_ms = (time.perf_counter() - probe_started) * 1000
        stop.set()
        if errors:
            raise RuntimeError(f"{kind}: long-polling agents failed: {errors[:3]}")
    return {"idle_rss_mb": round(idle, 1), "rss_mb": round(loaded, 1), "per_agent_kb": round((loaded - idle) * 1024 / len(tokens), 1),
            "threads": threads_now, "db_connections": connections, "healthz_while_waiting_ms": round(probe_ms, 1),
            "healthz_status": health}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--servers", default="gunicorn-gthread,daphne")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds the agents wait before measuring")
    args = parser.parse_args()
    _url, params = fresh_database()

    from coordination.services import agent_registry

    tokens = [agent_registry.agent_create(name=f"idle-{i}", roles=["idle"])[1] for i in range(args.agents)]
    results = {}
    for kind in [s for s in args.servers.split(",") if s]:
        results[kind] = measure(kind, tokens, params, args.hold)
        say(f"{kind}: {results[kind]}")
    table(f"Footprint: web server with {args.agents} long-polling agents",
          ["server", "idle MB", "with agents MB", "KB per agent", "threads", "DB connections", "healthz ms"],
          [[kind, r["idle_rss_mb"], r["rss_mb"], r["per_agent_kb"], r["threads"], r["db_connections"],
            r["healthz_while_waiting_ms"]] for kind, r in results.items()])
    emit({"benchmark": "footprint", "agents": args.agents, **results})


if __name__ == "__main__":
    main()
