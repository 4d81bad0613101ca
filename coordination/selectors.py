"""Non-trivial reads of the coordination domain."""

from collections import defaultdict
from datetime import timedelta
from uuid import UUID

from django.conf import settings
from django.db.models import Count, F, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone

from coordination.errors import NotFound
from coordination.models import (
    EVENT_SEQ_BOUND_SQL,
    EVENT_SEQ_OWN_SQL,
    EVENT_SEQ_SPAN,
    Agent,
    AuditReport,
    Event,
    FileLock,
    FileVersion,
    Step,
    StepDependency,
    StepStatus,
    Workflow,
)
from coordination.paths import paths_overlap


def workflow_list_recent(*, limit: int = 50) -> QuerySet[Workflow]:
    return Workflow.objects.select_related("project").order_by("-created_at")[:limit]


def workflow_list(*, status: str | None = None, project: str | None = None) -> QuerySet[Workflow]:
    workflows = Workflow.objects.select_related("project").order_by("-created_at", "id")
    if status:
        workflows = workflows.filter(status=status)
    if project:
        workflows = workflows.filter(project__name=project)
    return workflows


def workflow_get(*, workflow_id: UUID) -> Workflow:
    workflow = Workflow.objects.select_related("project").filter(id=workflow_id).first()
    if workflow is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return workflow


def workflow_steps(*, workflow: Workflow) -> tuple[list[Step], dict[UUID, list[str]]]:
    """The steps of a workflow and, for each, the keys it depends on (three queries in all)."""
    steps = list(Step.objects.filter(workflow=workflow).select_related("lease_agent").order_by("created_at", "key"))
    keys = {step.id: step.key for step in steps}
    depends_on: dict[UUID, list[str]] = defaultdict(list)
    for step_id, dep_id in StepDependency.objects.filter(workflow=workflow).values_list("step_id", "depends_on_id"):
        depends_on[step_id].append(keys[dep_id])
    return steps, {step_id: sorted(deps) for step_id, deps in depends_on.items()}


def step_get(*, step_id: UUID) -> Step:
    step = Step.objects.select_related("workflow__project", "lease_agent").filter(id=step_id).first()
    if step is None:
        raise NotFound(f"Step {step_id} does not exist.")
    return step


def visible_events(events: QuerySet[Event]) -> QuerySet[Event]:
    """Only the final part of the log: events below the oldest transaction still running, which no transaction
    can add to any more (`models.NextEventSeq`). Read in `seq` order, a reader that goes on from the last `seq`
    it saw misses nothing; an event committed by a long transaction shows once that transaction has ended.
    A transaction also reads its own events."""
    own = RawSQL(EVENT_SEQ_OWN_SQL, [])
    return events.filter(Q(seq__lt=RawSQL(EVENT_SEQ_BOUND_SQL, []))
                         | Q(seq__gte=own, seq__lt=RawSQL(f"{EVENT_SEQ_OWN_SQL} + {EVENT_SEQ_SPAN}", [])))


def workflow_events(*, workflow: Workflow, after: int = 0, limit: int = 500) -> tuple[list[Event], bool]:
    events = list(visible_events(Event.objects.filter(workflow=workflow, seq__gt=after)).order_by("seq")[: limit + 1])
    return events[:limit], len(events) > limit


def workflow_last_seq(workflow_id) -> int:
    """The `seq` of the workflow's last visible event (0 with none): where a page's catch-up goes on from."""
    last = visible_events(Event.objects.filter(workflow_id=workflow_id)).order_by("-seq").values_list("seq").first()
    return last[0] if last else 0


def workflow_audits(*, workflow: Workflow) -> QuerySet[AuditReport]:
    return AuditReport.objects.filter(workflow=workflow).order_by("-created_at")


def agent_list() -> QuerySet[Agent]:
    return agents_with_load()


def agents_with_load() -> QuerySet[Agent]:
    """Agents with `steps_held`, `locks_held`, `online`, `tokens_used` and `cost_usd`, in one query.

    Its cost does not grow with history: usage comes from the totals kept as results are stored
    (`AgentUsage`), and what an agent holds is counted through partial indexes of live leases and locks.
    """
    from django.db.models import DecimalField, IntegerField, OuterRef, Subquery, Value
    from django.db.models.functions import Coalesce

    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.AM_AGENT_ONLINE_WINDOW_S)

    def _count(queryset, by: str):
        # A count per agent as a subquery: each reads only that agent's live rows, through a partial index.
        counted = queryset.order_by().values(by).annotate(n=Count("id")).values("n")
        return Coalesce(Subquery(counted, output_field=IntegerField()), 0)

    held = Step.objects.filter(lease_agent=OuterRef("pk"), status=StepStatus.IN_PROGRESS)
    locks = FileLock.objects.filter(agent=OuterRef("pk"), released_at__isnull=True, expires_at__gt=now)
    return Agent.objects.order_by("name").annotate(
        steps_held=_count(held, "lease_agent"),
        locks_held=_count(locks, "agent"),
        online_q=Q(last_seen_at__gte=cutoff, enabled=True),
        tokens_used=Coalesce(F("usage__prompt_tokens") + F("usage__completion_tokens"), 0,
                             output_field=IntegerField()),
        cost_usd=Coalesce(F("usage__cost_usd"), Value(0), output_field=DecimalField(max_digits=20, decimal_places=6)),
    )


def locks_live(*, project: str | None = None, path: str | None = None, agent: str | None = None) -> list[FileLock]:
    """Locks not released and not expired, optionally those overlapping a normalised `path`."""
    locks = FileLock.objects.filter(released_at__isnull=True, expires_at__gt=timezone.now()).select_related(
        "project", "agent"
    ).order_by("project__name", "path", "acquired_at")
    if project is not None:
        locks = locks.filter(project__name=project)
    if agent is not None:
        locks = locks.filter(agent__name=agent)
    if path is None:
        return list(locks)
    return [lock for lock in locks if paths_overlap(lock.path, path)]


def locks_by_id(ids) -> list[FileLock]:
    return list(FileLock.objects.filter(id__in=ids).select_related("project", "agent").order_by("path"))


def workflow_steps_for_review(*, workflow: Workflow) -> list[dict]:
    """Steps as the planner, auditor and synthesis see them, in creation order."""
    steps, depends_on = workflow_steps(workflow=workflow)
    return [
        {"key": step.key, "name": step.name, "role": step.role, "status": step.status,
         "depends_on": depends_on.get(step.id, []), "final_result": step.final_result, "outputs": step.outputs}
        for step in steps
    ]


def workflow_audit_checks(*, workflow: Workflow) -> list[dict]:
    """The deterministic checks of an audit: each {name, passed, required, detail, steps?}."""
    from django.db.models import Sum

    from coordination.models import Attempt, Result

    steps = list(Step.objects.filter(workflow=workflow).order_by("created_at", "key"))
    checks = []
    empty = [s.key for s in steps if s.status == StepStatus.COMPLETED and not s.final_result.strip()]
    checks.append({"name": "results_present", "required": True, "passed": not empty, "steps": empty,
                   "detail": "Every completed step has a result." if not empty
                   else f"Steps without a result: {', '.join(empty)}."})

    outcomes = dict(Attempt.objects.filter(step__workflow=workflow).values_list("outcome").annotate(n=Count("id")))
    failed = [s.key for s in steps if s.status in (StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED)]
    checks.append({
        "name": "failures_and_retries", "required": True, "passed": not failed, "steps": failed,
        "detail": (f"{outcomes.get('expired', 0)} lost lease(s), {outcomes.get('retry', 0)} retried failure(s), "
                   f"{outcomes.get('failed', 0)} failure(s), {outcomes.get('released', 0)} hand-back(s)"
                   + (f"; not completed: {', '.join(failed)}." if failed else ".")),
    })

    unlocked = workflow_writes_outside_locks(workflow=workflow)
    changed = FileVersion.objects.filter(step__workflow=workflow).count()
    checks.append({"name": "writes_locked", "required": True, "passed": not unlocked,
                   "steps": sorted({item.split(":", 1)[0] for item in unlocked}),
                   "detail": (f"All {changed} file change(s) the server recorded for this workflow's steps were "
                              "made under a live write lock held by their writer." if not unlocked
                              else f"Changed outside a live write lock: {', '.join(unlocked)}.")})

    totals = Result.objects.filter(step__workflow=workflow).aggregate(
        time=Sum("execution_time_s"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
        cost=Sum("cost_usd"))
    slowest = Result.objects.filter(step__workflow=workflow, execution_time_s__isnull=False).order_by(
        "-execution_time_s").select_related("step").first()
    checks.append({"name": "durations", "required": False, "passed": True,
                   "detail": f"{totals['time'] or 0:.1f} s of agent time"
                   + (f"; slowest {slowest.step.key} ({slowest.execution_time_s:.1f} s)." if slowest else ".")})
    tokens = (totals["prompt"] or 0) + (totals["completion"] or 0)
    within = not ((workflow.budget_usd is not None and workflow.spent_usd > workflow.budget_usd)
                  or (workflow.budget_tokens is not None and workflow.spent_tokens > workflow.budget_tokens))
    checks.append({"name": "usage", "required": False, "passed": within,
                   "detail": f"{tokens} tokens, ${float(totals['cost'] or 0):.4f}"
                   + ("" if within else " — over budget.")})
    return checks


# Plain SQL: every change a workflow's steps made, with the lock it was written under as it is stored, to
# check from the server's own records (not the agents' reports) that each was made under a live write lock.
WRITES_OUTSIDE_LOCKS_SQL = """
SELECT s.key AS step_key, v.path, v.version
FROM coordination_fileversion v
JOIN coordination_step s ON s.id = v.step_id
LEFT JOIN coordination_filelock l ON l.id = v.lock_id
WHERE s.workflow_id = %(workflow)s
  AND (l.id IS NULL OR l.mode <> 'write' OR l.agent_id IS DISTINCT FROM v.agent_id OR l.fencing <> v.fencing
       OR l.acquired_at > v.changed_at OR l.expires_at < v.changed_at
       OR (l.released_at IS NOT NULL AND l.released_at < v.changed_at))
ORDER BY v.version, v.path
"""


def workflow_writes_outside_locks(*, workflow: Workflow) -> list[str]:
    """`step:path@version` for each change of the workflow's steps not made under a live write lock of its writer."""
    from django.db import connection

    from coordination import rows

    with connection.cursor() as cursor:
        cursor.execute(WRITES_OUTSIDE_LOCKS_SQL, {"workflow": workflow.id})
        return [f"{row['step_key']}:{row['path']}@{row['version']}" for row in rows.fetch_all_named(cursor)]

