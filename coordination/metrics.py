"""Prometheus metrics at /metrics, read from the maintained counters at scrape time."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from coordination.models import STEP_COUNTER_FIELDS, Agent, Event, FileLock, Workflow, WorkflowDelta, WorkflowStatus


class CoordinationCollector:
    def collect(self):
        now = timezone.now()
        workflows = GaugeMetricFamily("am_workflows", "Workflows by status.", labels=["status"])
        by_status = dict(Workflow.objects.values_list("status").annotate(n=Count("id")))
        for status in WorkflowStatus.values:
            workflows.add_metric([status], by_status.get(status, 0))
        yield workflows

        steps = GaugeMetricFamily("am_steps", "Steps by status, over all workflows.", labels=["status"])
        aggregates = {status: Sum(field) for status, field in STEP_COUNTER_FIELDS.items()}
        sums = Workflow.objects.aggregate(**aggregates)
        deltas = WorkflowDelta.objects.aggregate(**aggregates)  # not folded in yet
        for status in STEP_COUNTER_FIELDS:
            steps.add_metric([status], (sums[status] or 0) + (deltas[status] or 0))
        yield steps

        cutoff = now - timedelta(seconds=settings.AM_AGENT_ONLINE_WINDOW_S)
        agents = Agent.objects.aggregate(
            n_total=Count("id"), n_enabled=Count("id", filter=Q(enabled=True)),
            n_online=Count("id", filter=Q(enabled=True, last_seen_at__gte=cutoff)),
        )
        family = GaugeMetricFamily("am_agents", "Registered agents.", labels=["state"])
        for state in ("total", "enabled", "online"):
            family.add_metric([state], agents[f"n_{state}"])
        yield family

        yield GaugeMetricFamily(
            "am_file_locks_live", "File locks held and not expired.",
            value=FileLock.objects.filter(released_at__isnull=True, expires_at__gt=now).count(),
        )
        last = Event.objects.order_by("-id").values_list("id", flat=True).first() or 0
        yield GaugeMetricFamily("am_events_last_id", "Id of the newest event (grows with every change).", value=last)


_registry = CollectorRegistry()
_registry.register(CoordinationCollector())
ProcessCollector(registry=_registry)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
