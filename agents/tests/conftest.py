import pytest

from agents.tests.fake_llm import FakeLLM
from coordination.tests.conftest import (  # noqa: F401 - shared fixtures
    _stop_notification_listener,
    developer,
    live_am,
    live_celery,
    owner,
    owner_client,
)


@pytest.fixture
def fake_llm():
    server = FakeLLM().start()
    yield server
    server.stop()
