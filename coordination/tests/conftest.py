"""Named fixtures: an owner (a person), a permitted agent, an outsider."""

from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from coordination import services
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
    agent, token = services.agent_create(name=name, roles=roles, capacity=capacity, can_submit=can_submit)
    return AgentWithToken(agent, token)


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
