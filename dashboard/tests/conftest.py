import pytest
from django.contrib.auth import get_user_model

from coordination.tests.conftest import (  # noqa: F401 - shared fixtures
    _stop_notification_listener,
    developer,
    live_am,
    make_agent,
    other_developer,
    owner,
    owner_client,
)


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user(username="ops", password="pw-ops-12345", is_staff=True,
                                                is_superuser=True)


@pytest.fixture
def owner_browser(client, owner):
    client.force_login(owner)
    return client


@pytest.fixture
def staff_browser(client, staff):
    client.force_login(staff)
    return client
