"""The settled-status rule is written twice: in Python (`settled_status`, `workflow_after`) and in SQL
(`SETTLED_STATUS_SQL`, inside the report's one-statement completion). This pins the twin to the rule."""

import itertools
from decimal import Decimal
from uuid import uuid4

import pytest
from django.db import connection

from coordination.models import StepStatus, WorkflowStatus
from coordination.services.workflow_counters import SETTLED_STATUS_SQL, WorkflowSnapshot, workflow_after

pytestmark = pytest.mark.django_db

_EVAL_SQL = f"""
SELECT w.i, {SETTLED_STATUS_SQL} AS settled
FROM unnest(%(i)s::int[], %(status)s::text[], %(total)s::int[], %(completed)s::int[], %(ready)s::int[],
            %(in_progress)s::int[], %(spent_usd)s::numeric[], %(budget_usd)s::numeric[], %(spent_tokens)s::bigint[],
            %(budget_tokens)s::bigint[])
     AS w(i, status, total_steps, n_completed, n_ready, n_in_progress, spent_usd, budget_usd, spent_tokens,
          budget_tokens)
"""


def _cases():
    """Every workflow status, every split of up to 3 steps over completed / ready / in progress / other,
    and budgets in USD and tokens below, at and above the spend (or none)."""
    spends = [(Decimal("1.0"), None), (Decimal("1.0"), Decimal("2.0")), (Decimal("1.0"), Decimal("1.0")),
              (Decimal("1.0"), Decimal("0.5"))]
    tokens = [(100, None), (100, 200), (100, 100), (100, 50)]
    for status in WorkflowStatus.values:
        for total in range(0, 4):
            for completed, ready, in_progress in itertools.product(range(total + 1), repeat=3):
                if completed + ready + in_progress > total:
                    continue
                for (spent_usd, budget_usd), (spent_tokens, budget_tokens) in itertools.product(spends, tokens):
                    yield (status, total, completed, ready, in_progress, spent_usd, budget_usd, spent_tokens,
                           budget_tokens)


class SettledStatusTwinTests:
    def test_it_agrees_with_the_python_rule_for_every_combination_of_counters(self):
        cases = list(_cases())
        assert len(cases) > 1000
        columns = list(zip(*cases))
        with connection.cursor() as cursor:
            cursor.execute(_EVAL_SQL, {
                "i": list(range(len(cases))), "status": list(columns[0]), "total": list(columns[1]),
                "completed": list(columns[2]), "ready": list(columns[3]), "in_progress": list(columns[4]),
                "spent_usd": list(columns[5]), "budget_usd": list(columns[6]), "spent_tokens": list(columns[7]),
                "budget_tokens": list(columns[8])})
            from_sql = dict(cursor.fetchall())
        disagreements = []
        for index, (status, total, completed, ready, in_progress, spent_usd, budget_usd, spent_tokens,
                    budget_tokens) in enumerate(cases):
            counts = {value: 0 for value in StepStatus.values}
            counts.update({StepStatus.COMPLETED: completed, StepStatus.READY: ready,
                           StepStatus.IN_PROGRESS: in_progress,
                           StepStatus.FAILED: total - completed - ready - in_progress})
            snapshot = WorkflowSnapshot(id=uuid4(), status=status, total_steps=total, counts=counts,
                                        spent_usd=spent_usd, spent_tokens=spent_tokens,
                                        budget_usd=budget_usd, budget_tokens=budget_tokens)
            expected, _ = workflow_after(snapshot)
            if from_sql[index] != expected:
                disagreements.append((cases[index], from_sql[index], expected))
        assert not disagreements, disagreements[:5]
