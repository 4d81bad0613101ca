"""Profile: where the server's time goes in one pull + report cycle.

Runs `--cycles` pull+report cycles in process, through Django's full request
path (middleware, DRF, services) with the test client on the bench database,
and prints the SQL statements of one cycle, the time per cycle and the
functions that cost the most (cProfile, cumulative and own time).

    python bench/profile_cycle.py [--cycles 200] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from _harness import emit, fresh_database, say


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    fresh_database()
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from coordination.services import agent_registry, workflow_creation, workflow_specs

    workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(
        name="profile", steps=tuple(workflow_specs.StepSpec(key=f"s{i}", name="x", role="bench")
                                    for i in range(args.cycles + 20))))
    _, token = agent_registry.agent_create(name="profiler", roles=["bench"], capacity=1)
    client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {token}")

    def cycle() -> None:
        pulled = client.get("/v1/tasks/bench/ready")
        assert pulled.status_code == 200, pulled.content
        body = pulled.json()
        reported = client.post("/v1/report_result", {"step_id": body["step"]["id"],
                                                      "lease_token": body["lease"]["token"],
                                                      "status": "completed"}, content_type="application/json")
        assert reported.status_code == 200, reported.content

    for _ in range(10):  # warm up: connections, URL resolver, serializers
        cycle()
    with CaptureQueriesContext(connection) as queries:
        cycle()
    print(f"\nSQL statements in one cycle: {len(queries.captured_queries)}")
    for query in queries.captured_queries:
        print(f"  {query['time']}s  {query['sql'][:150]}")

    started = time.perf_counter()
    for _ in range(args.cycles // 2):
        cycle()
    plain_ms = (time.perf_counter() - started) / (args.cycles // 2) * 1000

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.cycles // 2):
        cycle()
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\nPer cycle: {plain_ms:.2f} ms without the profiler")
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    say("done")
    emit({"benchmark": "profile_cycle", "ms_per_cycle": round(plain_ms, 2),
          "queries_per_cycle": len(queries.captured_queries)})


if __name__ == "__main__":
    main()
