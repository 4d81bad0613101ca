"""Non-trivial reads of the coordination domain."""

from django.db.models import QuerySet

from coordination.models import Agent, Workflow


def workflow_list_recent(*, limit: int = 50) -> QuerySet[Workflow]:
    return Workflow.objects.select_related("project").order_by("-created_at")[:limit]


def agent_list() -> QuerySet[Agent]:
    return Agent.objects.order_by("name")
