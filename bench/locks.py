"""Locks: grants and releases per second through the HTTP API, with and without contention.

On the worker API server as `make run` serves it, `--clients` agents each
acquire an exclusive lock (`POST /v1/locks`) and release it
(`DELETE /v1/locks/{id}`), over and over:
- without contention: each agent locks paths of its own;
- with contention: every agent wants the same path (`wait_s`, so a request
  waits in the queue until the holder releases and is then granted);
- shared: every agent takes a shared lock on the same path (no conflict, but
  every grant bumps the same fencing counter).
Afterwards the lock history is checked: no two exclusive grants of the
contended path ever overlapped.

    python bench/locks.py [--clients 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import threading
import time

from _harness import emit, fresh_database, percentile, run_clients, say, server, table


def run(url: str, tokens: list[str], seconds: float, scenario: str) -> dict:
    import httpx

    done = [0] * len(tokens)
    latencies: list[float] = []
    guard = threading.Lock()

    def client(index: int, stop, errors: list[str]) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[index]}"}, timeout=60) as http:
            n = 0
            while not stop.is_set():
                n += 1
                path = f"agent{index}/file{n % 50}.txt" if scenario == "uncontended" else "shared/hot.txt"
                mode = "read" if scenario == "shared" else "write"
                started = time.perf_counter()
                granted = http.post("/v1/locks", json={"project": "default", "paths": [path], "mode": mode,
                                                       "ttl_s": 60, "wait_s": 30})
                if granted.status_code != 201:
                    errors.append(f"acquire {granted.status_code} {granted.text[:200]}")
                    return
                with guard:
                    latencies.append(time.perf_counter() - started)
                released = http.delete(f"/v1/locks/{granted.json()['locks'][0]['id']}")
                if released.status_code != 204:
                    errors.append(f"release {released.status_code}")
                    return
                done[index] += 1

    elapsed = run_clients(client, len(tokens), seconds, scenario)
    return {"cycles_per_s": round(sum(done) / elapsed, 1), "cycles": sum(done),
            "grant_p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "grant_p99_ms": round(percentile(latencies, 99) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--server", default="gunicorn-gthread")
    args = parser.parse_args()
    fresh_database()

    from coordination.services import agent_registry
    from coordination.models import FileLock

    tokens = [agent_registry.agent_create(name=f"locker-{i}", roles=["bench"])[1] for i in range(args.clients)]
    results = {}
    with server(args.server) as (base, _process):
        run(base, tokens[:2], 1.0, "uncontended")  # warm up
        for scenario in ("uncontended", "contended", "shared"):
            results[scenario] = run(base, tokens, args.seconds, scenario)
            say(f"{scenario}: {results[scenario]}")
    overlaps = FileLock.objects.raw(
        """SELECT a.id FROM coordination_filelock a JOIN coordination_filelock b
           ON a.path = b.path AND a.id < b.id AND a.mode = 'write' AND b.mode = 'write'
           AND a.acquired_at < coalesce(b.released_at, b.expires_at)
           AND b.acquired_at < coalesce(a.released_at, a.expires_at)
           WHERE a.path = 'shared/hot.txt' LIMIT 1""")
    results["exclusive_overlaps_in_history"] = len(list(overlaps))
    table(f"Locks: acquire + release cycles per second, {args.clients} agents ({args.server})",
          ["scenario", "cycles/s", "grant p50 ms", "grant p99 ms"],
          [[name, r["cycles_per_s"], r["grant_p50_ms"], r["grant_p99_ms"]] for name, r in results.items()
           if isinstance(r, dict)])
    print(f"Overlapping exclusive grants in the lock history: {results['exclusive_overlaps_in_history']}")
    emit({"benchmark": "locks", "clients": args.clients, "server": args.server, **results})


if __name__ == "__main__":
    main()
