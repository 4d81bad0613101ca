"""The worker SDK's client side without a live server: pull answer shapes, and results kept while the
server is down (a stand-in transport plays the server, as it does when one is older, newer or gone)."""

import json
import threading
import time

import httpx

from agents import Result, Worker
from agents.client import Client

LEASE = {"step": {"id": "6f1c", "key": "A", "name": "Step A", "role": "developer", "attempt": 1, "files": [],
                  "inputs": {}},
         "workflow": {"id": "w1", "name": "W", "project": "default"},
         "lease": {"token": "tok-A", "expires_at": "2026-11-25T10:00:00Z", "ttl_s": 60, "locks": []}}
LEASE_B = {**LEASE, "step": {**LEASE["step"], "id": "7a2d", "key": "B"}, "lease": {**LEASE["lease"], "token": "tok-B"}}


class Server:
    """Answers the way a server does; records what it was asked."""

    def __init__(self, *, takes_max: bool, leases=(), report_status: int = 200) -> None:
        self.takes_max = takes_max
        self.leases = list(leases)
        self.report_status = report_status
        self.requests: list[httpx.Request] = []
        self.reports: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path.endswith("/ready"):
            if "max" in request.url.params and not self.takes_max:
                return httpx.Response(400, json={"error": "invalid_request",
                                                 "detail": "Unknown query parameter(s): 'max'; known: wait."})
            if not self.leases:
                time.sleep(0.05)
                return httpx.Response(204)
            if "max" in request.url.params:
                taken = self.leases[:int(request.url.params["max"])]
                del self.leases[:len(taken)]
                return httpx.Response(200, json={"leases": taken})
            return httpx.Response(200, json=self.leases.pop(0))
        if path.endswith("/heartbeat"):
            return httpx.Response(200, json={"expires_at": "2026-11-25T10:01:00Z", "cancel": False})
        if path == "/v1/report_result":
            if self.report_status != 200:
                return httpx.Response(self.report_status, json={"error": "unavailable", "detail": "down"})
            body = json.loads(request.content)
            self.reports.append(body)
            return httpx.Response(200, json={"step_id": body["step_id"], "status": body["status"],
                                             "workflow_status": "running", "released": []})
        return httpx.Response(404, json={"error": "not_found", "detail": path})

    def pulls(self) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path.endswith("/ready")]


def _client(server: Server) -> Client:
    return Client("http://am.test", "agent-token", transport=httpx.MockTransport(server), max_backoff=0.2)


class PullShapeTests:
    def test_free_slots_are_asked_for_and_a_batch_answer_gives_each_lease(self):
        server = Server(takes_max=True, leases=[LEASE, LEASE_B])
        client = _client(server)
        pulled = client.pull_batch(["developer", "tester"], max=3, wait=0)
        assert [p.step_id for p in pulled] == ["6f1c", "7a2d"] and [p.token for p in pulled] == ["tok-A", "tok-B"]
        request = server.pulls()[0]
        assert request.url.path == "/v1/tasks/developer,tester/ready" and request.url.params["max"] == "3"
        assert request.headers["Idempotency-Key"] and client.batch_pulls is True
        assert client.pull_batch(["developer"], max=2, wait=0) == [], "204: nothing ready"

    def test_a_server_without_batch_pulls_is_asked_for_one_step_at_a_time(self):
        server = Server(takes_max=False, leases=[LEASE, LEASE_B])
        client = _client(server)
        assert [p.step_id for p in client.pull_batch(["developer"], max=4, wait=0)] == ["6f1c"]
        assert [p.step_id for p in client.pull_batch(["developer"], max=4, wait=0)] == ["7a2d"]
        asked = [dict(request.url.params) for request in server.pulls()]
        assert asked == [{"wait": "0", "max": "4"}, {"wait": "0"}, {"wait": "0"}], "max is not sent again once refused"
        assert client.batch_pulls is False

    def test_one_free_slot_asks_without_max(self):
        server = Server(takes_max=True, leases=[LEASE])
        assert [p.step_id for p in _client(server).pull_batch(["developer"], max=1, wait=0)] == ["6f1c"]
        assert "max" not in server.pulls()[0].url.params


class SpoolTests:
    def test_a_result_the_server_cannot_take_is_kept_on_disk_and_delivered_at_the_next_start(self, tmp_path):
        down = Server(takes_max=False, leases=[LEASE], report_status=503)
        worker = Worker("http://am.test", "agent-token", workspace=tmp_path, poll_wait_s=0, client=_client(down))
        worker.register(lambda step: Result(final_result=f"done {step.key}", outputs={"n": 1}), "developer")
        runner = threading.Thread(target=worker.run, kwargs={"max_steps": 1}, daemon=True)
        runner.start()
        deadline = time.monotonic() + 10
        while not any(r.url.path == "/v1/report_result" for r in down.requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert runner.is_alive(), "the report is retried while the server answers 503"
        worker.stop(grace_s=0)
        runner.join(timeout=10)
        assert not runner.is_alive()
        kept = list(worker.spool_dir.glob("*.json"))
        assert [path.name for path in kept] == ["6f1c.json"]
        assert json.loads(kept[0].read_text())["final_result"] == "done A"

        up = Server(takes_max=False)
        again = Worker("http://am.test", "agent-token", workspace=tmp_path, client=_client(up))
        again.deliver_spooled()
        assert [(r["step_id"], r["lease_token"], r["status"], r["final_result"]) for r in up.reports] == [
            ("6f1c", "tok-A", "completed", "done A")]
        assert not list(worker.spool_dir.glob("*.json"))
        other = Worker("http://am.test", "another-agent", workspace=tmp_path, client=_client(up))
        assert other.spool_dir != worker.spool_dir, "a worker never sends another agent's kept results"
