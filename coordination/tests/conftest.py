"""Named fixtures: an owner (a person), a permitted agent, an outsider."""

from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from coordination.services import agent_registry
from coordination.models import Agent


@dataclass
class AgentWithToken:
    agent: Agent
    token: str

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.token}")
        return client


def make_agent(name: str, roles: list[str], capacity: int = 1, can_submit: bool = False) -> AgentWithToken:
    agent, token = agent_registry.agent_create(name=name, roles=roles, capacity=capacity, can_submit=can_submit)
    return AgentWithToken(agent, token)


@pytest.fixture(scope="session", autouse=True)
def _stop_notification_listener(django_db_setup):
    """The listener thread keeps a connection to the test database; close it before the database is dropped."""
    yield
    from coordination.notify import listener

    listener.stop()


@pytest.fixture
def developer(db) -> AgentWithToken:
    """A permitted agent: holds the developer role."""
    return make_agent("dev-1", ["developer"], capacity=2)


@pytest.fixture
def other_developer(db) -> AgentWithToken:
    return make_agent("dev-2", ["developer"], capacity=2)


@pytest.fixture
def outsider(db) -> AgentWithToken:
    """An agent without the developer role."""
    return make_agent("writer-1", ["writer"])


@pytest.fixture
def submitter(db) -> AgentWithToken:
    return make_agent("pipeline", ["planner"], can_submit=True)


@pytest.fixture
def owner(db):
    return get_user_model().objects.create_user(username="owner", password="pw-owner-123")


@pytest.fixture
def owner_client(owner) -> APIClient:
    client = APIClient()
    client.force_authenticate(owner)
    return client


def _database_url(settings_dict) -> str:
    from urllib.parse import quote

    user = quote(settings_dict.get("USER") or "", safe="")
    password = settings_dict.get("PASSWORD") or ""
    auth = f"{user}:{quote(password, safe='')}@" if password else f"{user}@"
    host = quote(settings_dict.get("HOST") or "127.0.0.1", safe="")
    port = settings_dict.get("PORT") or 5432
    return f"postgresql://{auth}{host}:{port}/{settings_dict['NAME']}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live_am(django_db_setup, django_db_blocker):
    """A real daphne process serving AM on the test database: its base URL."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from django.conf import settings
    from django.db import connection

    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
        "AM_LOG_LEVEL": "WARNING",
    }
    base_dir = Path(__file__).resolve().parent.parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "am_project.asgi:application"],
        cwd=base_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited: {process.stderr.read()}")
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


@pytest.fixture(scope="session")
def live_celery(django_db_setup):
    """A real Celery worker with beat (sweeping every second) on the test database, on a queue of its own."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

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
    base_dir = Path(__file__).resolve().parent.parent.parent
    schedule = Path(os.environ.get("TMPDIR", "/tmp")) / f"{queue}-beat"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "am_project", "worker", "-B", "-s", str(schedule), "-Q", queue,
         "-c", "1", "-l", "warning", "-n", f"{queue}@%h"],
        cwd=base_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
