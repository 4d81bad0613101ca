"""Live: time from a report's commit to the WebSocket frame, at 50 open dashboard sockets.

The stack as `make run` runs it: reports go to the worker API server (gunicorn
with threads), dashboards hold WebSockets on daphne, and events travel between
the two through Redis. `--sockets` logged-in workflow pages are open; one agent
pulls and reports the workflow's steps one at a time, and for each report we
time the frame that shows the step completed on every socket:
- after the report's response (the commit happened just before it: a lower bound
  on commit-to-frame, off by the response's trip back), and
- after the report was sent (an upper bound).

    python bench/live.py [--sockets 50] [--reports 100]
"""

from __future__ import annotations

import argparse
import re
import threading
import time

from _harness import emit, fresh_database, percentile, say, server, table


class Socket(threading.Thread):
    """One dashboard page's WebSocket, noting when each step is first shown completed."""

    def __init__(self, url: str, origin: str, cookie: str) -> None:
        super().__init__(daemon=True)
        from websockets.sync.client import connect

        self.conn = connect(url, origin=origin, additional_headers={"Cookie": cookie}, open_timeout=30,
                            max_size=None)
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.frames = 0

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        pattern = re.compile(r'id="step-([0-9a-f-]{36})" data-status="completed"')
        try:
            for message in self.conn:
                now = time.perf_counter()
                self.frames += 1
                with self.lock:
                    for step_id in pattern.findall(message):
                        self.seen.setdefault(step_id, now)
        except ConnectionClosed:
            pass

    def seen_at(self, step_id: str) -> float | None:
        with self.lock:
            return self.seen.get(step_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--reports", type=int, default=100)
    args = parser.parse_args()
    fresh_database()

    import httpx
    from django.contrib.auth import get_user_model
    from django.test import Client

    from coordination.services import agent_registry, workflow_creation, workflow_specs

    steps = args.reports + 5
    workflow = workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(
        name="live", steps=tuple(workflow_specs.StepSpec(key=f"s{i}", name=f"step {i}", role="bench") for i in range(steps))))
    _, token = agent_registry.agent_create(name="reporter", roles=["bench"])
    user = get_user_model().objects.create_user("watcher", password="x", is_staff=True)
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}; csrftoken=benchcsrftoken"

    after_commit: list[float] = []
    after_send: list[float] = []
    missing = 0
    with server("daphne") as (dash, _d), server("gunicorn-gthread") as (api, _a):
        origin = dash
        ws_url = dash.replace("http://", "ws://") + f"/ws/workflows/{workflow.id}/"
        say(f"opening {args.sockets} dashboard sockets")
        sockets = [Socket(ws_url, origin, cookie) for _ in range(args.sockets)]
        for sock in sockets:
            sock.start()
        time.sleep(1.0)
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            for index in range(args.reports + 3):
                body = http.get("/v1/tasks/bench/ready").json()
                step_id = body["step"]["id"]
                time.sleep(0.05)  # the leased frame goes by first
                sent = time.perf_counter()
                response = http.post("/v1/report_result", json={
                    "step_id": step_id, "lease_token": body["lease"]["token"], "status": "completed"})
                answered = time.perf_counter()
                assert response.status_code == 200, response.text
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not all(s.seen_at(step_id) for s in sockets):
                    time.sleep(0.002)
                if index < 3:
                    continue  # warm-up: caches, connections
                for sock in sockets:
                    seen = sock.seen_at(step_id)
                    if seen is None:
                        missing += 1
                        continue
                    after_commit.append(max(0.0, seen - answered))
                    after_send.append(seen - sent)
                if (index - 2) % 25 == 0:
                    say(f"{index - 2} of {args.reports} reports")
        for sock in sockets:
            sock.conn.close()

    results = {
        "sockets": args.sockets,
        "reports": args.reports,
        "frames_timed": len(after_commit),
        "frames_missing": missing,
        "after_response_ms": {"p50": round(percentile(after_commit, 50) * 1000, 1),
                              "p99": round(percentile(after_commit, 99) * 1000, 1)},
        "after_send_ms": {"p50": round(percentile(after_send, 50) * 1000, 1),
                          "p99": round(percentile(after_send, 99) * 1000, 1)},
    }
    table(f"Live: report to WebSocket frame, {args.sockets} sockets, {args.reports} reports",
          ["measured from", "p50 ms", "p99 ms"],
          [["the report's response (commit)", results["after_response_ms"]["p50"], results["after_response_ms"]["p99"]],
           ["the report's request", results["after_send_ms"]["p50"], results["after_send_ms"]["p99"]]])
    p99 = results["after_send_ms"]["p99"]
    results["summary"] = {"p99_ms_upper_bound": p99, "target_p99_ms": 250, "meets_target": p99 < 250 and not missing}
    emit({"benchmark": "live", **results})


if __name__ == "__main__":
    main()
