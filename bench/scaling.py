"""Scaling: time and query count per heartbeat, per report and per status call, at 10, 1,000 and 10,000 steps.

The work per heartbeat and per report must follow the step itself and its own
dependents, and the status call must read maintained counters, so all three stay
flat as the workflow grows (target: the 10,000-step figure within 1.2x the
10-step one).

    python bench/scaling.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import os
import time

from _harness import emit, fresh_database, percentile, say, table

SIZES = [10, 1000, 10000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="reports and status calls measured per size")
    args = parser.parse_args()
    os.environ.setdefault("ALLOWED_HOSTS", "testserver,127.0.0.1")
    fresh_database()
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    from coordination.services import agent_registry, workflow_creation, workflow_specs

    # Per size, fans (one root, then leaves that depend on it): a leaf's report releases nothing, so the
    # figure isolates the cost that could grow with the workflow. The 10-step size needs several fans to
    # give as many reports as the others. Sizes are measured in turns, so none is favoured by running
    # first on a smaller, warmer database.
    clients, measured = {}, {}
    for size in SIZES:
        role = f"scale{size}"
        fans = -(-args.repeat // (size - 1))
        for fan in range(fans):
            workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(name=f"scale {size} #{fan}", steps=tuple(
                [workflow_specs.StepSpec(key="root", name="root", role=role)]
                + [workflow_specs.StepSpec(key=f"s{i}", name="x", role=role, depends_on=("root",))
                   for i in range(size - 1)])))
        _agent, token = agent_registry.agent_create(name=f"scaler-{size}", roles=[role], capacity=1)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        clients[size] = client
        for _ in range(fans):  # the roots: each releases a whole fan, measured apart from the steady state
            body = client.get(f"/v1/tasks/{role}/ready").json()
            assert body["step"]["key"] == "root", body
            client.post("/v1/report_result", {"step_id": body["step"]["id"], "lease_token": body["lease"]["token"],
                                              "status": "completed"}, format="json")
        measured[size] = ([], [], [], [], [], [])
    for _ in range(args.repeat):
        for size in SIZES:
            client = clients[size]
            report_ms, report_q, status_ms, status_q, beat_ms, beat_q = measured[size]
            body = client.get(f"/v1/tasks/scale{size}/ready").json()
            payload = {"step_id": body["step"]["id"], "lease_token": body["lease"]["token"], "status": "completed"}
            beat = {"lease_token": body["lease"]["token"],
                    "iterations": [{"iteration": 1, "thought": "t", "action": "a", "observation": "o"}]}
            with CaptureQueriesContext(connection) as beat_queries:
                started = time.perf_counter()
                response = client.post(f"/v1/steps/{body['step']['id']}/heartbeat", beat, format="json")
                beat_elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.content
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.post("/v1/report_result", payload, format="json")
                elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.content
            with CaptureQueriesContext(connection) as status_queries:
                started = time.perf_counter()
                status = client.get(f"/v1/workflows/{body['workflow']['id']}/status")
                status_elapsed = time.perf_counter() - started
            assert status.status_code == 200, status.content
            beat_ms.append(beat_elapsed * 1000)
            beat_q.append(len(beat_queries))
            report_ms.append(elapsed * 1000)
            report_q.append(len(queries))
            status_ms.append(status_elapsed * 1000)
            status_q.append(len(status_queries))
    results = {}
    for size in SIZES:
        report_ms, report_q, status_ms, status_q, beat_ms, beat_q = measured[size]
        results[size] = {
            "heartbeat_ms_p50": round(percentile(beat_ms, 50), 3), "heartbeat_queries": int(percentile(beat_q, 50)),
            "report_ms_p50": round(percentile(report_ms, 50), 3), "report_queries": int(percentile(report_q, 50)),
            "status_ms_p50": round(percentile(status_ms, 50), 3), "status_queries": int(percentile(status_q, 50)),
        }
        say(f"{size} steps: heartbeat {results[size]['heartbeat_ms_p50']} ms, "
            f"report {results[size]['report_ms_p50']} ms / {results[size]['report_queries']} queries, "
            f"status {results[size]['status_ms_p50']} ms / {results[size]['status_queries']} queries")
    small, large = results[SIZES[0]], results[SIZES[-1]]
    ratios = {"heartbeat_time": round(large["heartbeat_ms_p50"] / small["heartbeat_ms_p50"], 3),
              "heartbeat_queries": large["heartbeat_queries"] / small["heartbeat_queries"],
              "report_time": round(large["report_ms_p50"] / small["report_ms_p50"], 3),
              "status_time": round(large["status_ms_p50"] / small["status_ms_p50"], 3),
              "report_queries": large["report_queries"] / small["report_queries"],
              "status_queries": large["status_queries"] / small["status_queries"]}
    table("Scaling: per heartbeat, per report and per status call (p50, in-process test client)",
          ["steps", "heartbeat ms", "heartbeat queries", "report ms", "report queries", "status ms", "status queries"],
          [[size, r["heartbeat_ms_p50"], r["heartbeat_queries"], r["report_ms_p50"], r["report_queries"],
            r["status_ms_p50"], r["status_queries"]] for size, r in results.items()])
    print(f"10,000 vs 10 steps: heartbeat time x{ratios['heartbeat_time']}, report time x{ratios['report_time']}, status time x{ratios['status_time']} "
          f"(target: at most x1.2)")
    emit({"benchmark": "scaling", "results": results, "ratios_10000_vs_10": ratios,
          "meets_target": all(v <= 1.2 for v in ratios.values())})


if __name__ == "__main__":
    main()
