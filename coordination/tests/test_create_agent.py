import io

import pytest
from django.core.management import CommandError, call_command

from coordination.models import Agent, Event
from coordination.services.tokens import token_hash

pytestmark = pytest.mark.django_db


class CreateAgentCommandTests:
    def test_it_prints_the_token_alone_on_the_last_line_and_stores_only_its_hash(self):
        out = io.StringIO()
        call_command("create_agent", "worker-1", "--roles", "developer,tester", "--capacity", "3", stdout=out)
        token = out.getvalue().strip().splitlines()[-1]
        assert token.startswith("am_") and " " not in token and len(token) > 40
        agent = Agent.objects.get(name="worker-1")
        assert agent.roles == ["developer", "tester"]
        assert agent.capacity == 3
        assert agent.can_submit is False
        assert agent.token_hash == token_hash(token)
        assert token not in str(list(Agent.objects.values_list()))
        assert Event.objects.filter(kind="agent.created", agent=agent).exists()

    def test_it_sets_can_submit(self):
        call_command("create_agent", "planner", "--roles", "planner", "--can-submit", stdout=io.StringIO())
        assert Agent.objects.get(name="planner").can_submit is True

    def test_it_refuses_a_bad_role_naming_it(self):
        with pytest.raises(CommandError, match="'Dev Ops'"):
            call_command("create_agent", "w", "--roles", "Dev Ops", stdout=io.StringIO())
        assert not Agent.objects.filter(name="w").exists()

    def test_it_refuses_a_duplicate_name(self):
        call_command("create_agent", "w", "--roles", "developer", stdout=io.StringIO())
        with pytest.raises(CommandError, match="exists already"):
            call_command("create_agent", "w", "--roles", "developer", stdout=io.StringIO())

    def test_it_refuses_a_capacity_below_one(self):
        with pytest.raises(CommandError, match="at least 1"):
            call_command("create_agent", "w", "--roles", "developer", "--capacity", "0", stdout=io.StringIO())
