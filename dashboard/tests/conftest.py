"""The dashboard's fixtures: people logged in to it, and a workflow in progress to look at."""

import pytest
from django.contrib.auth import get_user_model

from coordination.services import leases, pull, workflow_creation


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


@pytest.fixture
def workflow(developer, step, workflow_spec):
    """Workflow "Dash": A (writes src/a.py) leased by the developer, one iteration in; B and approval step H after A."""
    workflow = workflow_creation.workflow_create(spec=workflow_spec(
        step("A", files=(("src/a.py", "write"),)), step("B", "A"), step("H", "A", role="human"), name="Dash"))
    lease = pull.step_pull(agent=developer.agent, roles=["developer"])
    leases.step_heartbeat(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token, iterations=[
        leases.IterationIn(index=1, thought="Look around first", action='{"tool": "list_files"}', observation="src/")])
    return workflow
