"""The hot statements are planned once per connection: parameters bound by the server, and kept prepared."""

import pytest
from django.db import connection

from coordination.services import pull, reports, workflow_creation

pytestmark = pytest.mark.django_db


class PreparedStatementTests:
    def test_a_pull_and_a_report_run_often_stay_prepared_on_the_connection(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(*(step(f"s{i}") for i in range(8))))
        for _ in range(7):
            [lease] = pull.steps_pull(agent=developer.agent, roles=["developer"])
            reports.step_report(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token,
                                outcome=reports.Outcome(status="completed"))
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            prepared = [row[0] for row in cursor.fetchall()]
        assert any("pull_seq = a.pull_seq + 1" in statement for statement in prepared)
        assert any("INSERT INTO coordination_result" in statement and "lease_token_hash = $" in statement
                   for statement in prepared)
        assert any("ORDER BY t.id FOR UPDATE" in statement for statement in prepared)  # its step's locks
