"""Fixtures every app's tests share: the people, the agents, test data builders and live servers.

Named fixtures: an owner (a person) and an `owner_client`, a permitted agent
(`developer`, `other_developer`), an `outsider` without the role, a `submitter`.
Factories for more: `make_agent("name", ["role"])`; `step(...)` and
`workflow_spec(...)` build what `workflow_creation.workflow_create` takes.
`live_am` and `live_celery` start real servers on the test database; a test
that uses them must be marked `slow` (`make test-fast` skips those).
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from coordination.models import Agent
from coordination.services import agent_registry, workflow_specs

BASE_DIR = Path(__file__).resolve().parent

# Fixtures that start a server process: a test using one takes seconds and must say so.
LIVE_SERVER_FIXTURES = frozenset({"live_am", "live_celery"})


@dataclass
class AgentWithToken:
    agent: Agent
    token: str

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.token}")
        return client


def agent_with_token(name: str, roles: list[str], capacity: int = 1, can_submit: bool = False) -> AgentWithToken:
    """Register an agent through the service, keeping the token it is shown once."""
    agent, token = agent_registry.agent_create(name=name, roles=roles, capacity=capacity, can_submit=can_submit)
    return AgentWithToken(agent, token)


def build_step(key: str, *deps: str, role: str = "developer", files: tuple = (), **extra) -> workflow_specs.StepSpec:
    return workflow_specs.StepSpec(
        key=key,
        name=extra.pop("name", f"Step {key}"),
        role=role,
        depends_on=tuple(deps),
        files=tuple(workflow_specs.FileSpec(path=p, mode=m) for p, m in files),
        **extra,
    )


def build_workflow_spec(*steps: workflow_specs.StepSpec, name: str = "Test workflow",
                        **extra) -> workflow_specs.WorkflowSpec:
    return workflow_specs.WorkflowSpec(name=name, steps=tuple(steps), **extra)


def pytest_collection_modifyitems(config, items):
    """Refuse a test that starts a live server without the `slow` mark, which `make test-fast` relies on."""
    unmarked = [item.nodeid for item in items
                if LIVE_SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("Mark these tests @pytest.mark.slow (they start a live server): " + ", ".join(unmarked))


@pytest.fixture(scope="session", autouse=True)
def _notification_listener(django_db_setup):
    """The listener thread, connected before the first test so that every test meets the agent cache as a server
    does (in use, not waiting for the first request to connect it); its connection to the test database is closed
    before the database is dropped."""
    from coordination.notify import listener

    listener.ensure_started()
    if not listener.connected.wait(timeout=30):
        raise RuntimeError("the notification listener did not connect to the test database within 30 s")
    yield
    listener.stop()


@pytest.fixture(autouse=True)
def _no_random_fold(monkeypatch):
    """Reports fold their workflow's counter deltas now and then, at random (`reports.FOLD_SHARE`): in process,
    tests see no fold unless they ask for one, so that what they count (statements, rows) does not depend on
    chance. Servers started by the tests fold as in production."""
    from coordination.services import reports

    monkeypatch.setattr(reports, "FOLD_SHARE", 0)


@pytest.fixture(autouse=True)
def _empty_agent_cache():
    """Agents a test cached are forgotten: its rows were rolled back without a notification."""
    yield
    from coordination.agent_cache import cache

    cache.forget(None)


@pytest.fixture
def make_agent(db):
    """`make_agent("name", ["role"], capacity=1, can_submit=False)`: an `AgentWithToken`."""
    return agent_with_token


@pytest.fixture
def step():
    """`step("B", "A", role="tester", files=(("src/b.py", "write"),), max_attempts=3)`: a step spec."""
    return build_step


@pytest.fixture
def workflow_spec():
    """`workflow_spec(step("A"), step("B", "A"), name="...", project="...")`: a workflow spec."""
    return build_workflow_spec


@pytest.fixture
def developer(db) -> AgentWithToken:
    """A permitted agent: holds the developer role."""
    return agent_with_token("dev-1", ["developer"], capacity=2)


@pytest.fixture
def other_developer(db) -> AgentWithToken:
    return agent_with_token("dev-2", ["developer"], capacity=2)


@pytest.fixture
def outsider(db) -> AgentWithToken:
    """An agent without the developer role."""
    return agent_with_token("writer-1", ["writer"])


@pytest.fixture
def submitter(db) -> AgentWithToken:
    return agent_with_token("pipeline", ["planner"], can_submit=True)


@pytest.fixture
def owner(db):
    return get_user_model().objects.create_user(username="owner", password="pw-owner-123")


@pytest.fixture
def owner_client(owner) -> APIClient:
    client = APIClient()
    client.force_authenticate(owner)
    return client


def _database_url(settings_dict) -> str:
    user = quote(settings_dict.get("USER") or "", safe="")
    password = settings_dict.get("PASSWORD") or ""
    auth = f"{user}:{quote(password, safe='')}@" if password else f"{user}@"
    host = quote(settings_dict.get("HOST") or "127.0.0.1", safe="")
    port = settings_dict.get("PORT") or 5432
    return f"postgresql://{auth}{host}:{port}/{settings_dict['NAME']}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live_am(django_db_setup, django_db_blocker):
    """A real daphne process serving AM on the test database: its base URL."""
    from django.conf import settings
    from django.db import connection

    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
        "AM_LOG_LEVEL": "WARNING",
    }
    # The server's log goes to a file (a pipe nobody reads would block the server once full), kept for
    # diagnosing a failed live test: its path is printed on failure to start, and it is left in the temp dir.
    log_path = os.path.join(tempfile.gettempdir(), f"am-live-server-{port}.log")
    log = open(log_path, "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "am_project.asgi:application"],
        cwd=BASE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited; its log: {log_path}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("daphne did not answer /healthz within 60 s")
        time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def live_celery(django_db_setup):
    """A real Celery worker with beat (sweeping every second) on the test database, on a queue of its own."""
    from django.conf import settings
    from django.db import connection

    queue = f"am-test-{os.getpid()}"
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
        "AM_CELERY_QUEUE": queue,
        "AM_SWEEP_INTERVAL_S": "1",
        "AM_LOG_LEVEL": "WARNING",
    }
    schedule = Path(os.environ.get("TMPDIR", "/tmp")) / f"{queue}-beat"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "am_project", "worker", "-B", "-s", str(schedule), "-Q", queue,
         "-c", "1", "-l", "warning", "-n", f"{queue}@%h"],
        cwd=BASE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    if process.poll() is not None:
        raise RuntimeError("the Celery worker exited at start")
    yield process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
