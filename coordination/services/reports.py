"""Reports: a worker's result applied to its step (or a person's decision on an approval step).

A completion releases the dependents whose last dependency it was; a failure
retries the step after a backoff while attempts remain, else fails it and skips
what is downstream. Only the current lease's holder may report; a report sent
again gets the first answer back and changes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from django.contrib.auth.models import AbstractBaseUser
from django.db import DatabaseError, OperationalError, connection, transaction
from django.utils import timezone

from agents.llm.base import Usage  # one definition for workers and server
from coordination import notify, rows, tracing
from coordination.errors import InvalidState, ServiceError, StaleLease
from coordination.events import inserted_event_published
from coordination.models import LIVE_FIELDS, STEP_COUNTER_FIELDS, Agent, Attempt, AttemptOutcome, Event, Result, Step, StepStatus, WorkflowStatus
from coordination.services import event_log, file_locks, leases, lock_order, tokens, workflow_control
from coordination.services.agent_registry import HUMAN_ROLE
from coordination.services.leases import IterationIn
from coordination.services.lock_order import Along
from coordination.services.workflow_counters import (
    COUNTER_COLUMNS,
    SETTLED_STATUS_SQL,
    add,
    new_event,
    settle_workflow,
    workflow_after,
    workflow_fold,
    workflow_move,
)

logger = logging.getLogger(__name__)

# The share of fast reports that fold their workflow's deltas into its row after committing (it never waits:
# `workflow_fold`), besides the sweep: it keeps a busy workflow's deltas to a few dozen rows, so reading its live
# counters stays cheap.
FOLD_SHARE = 1 / 32

# A common table expression of the statements that store a `Result` (their CTE `result`): the reporting agent's
# kept usage totals (`AgentUsage`), added only when the result was stored. Unreferenced, it runs after the rest
# of its statement, so the usage row is the last lock taken (see `lock_order`); a person's decision (no agent)
# adds nothing.
USAGE_CTE = """
usage AS (
    INSERT INTO coordination_agentusage AS u (agent_id, prompt_tokens, completion_tokens, cost_usd, steps_completed,
                                              steps_failed, updated_at)
    SELECT %(agent)s::uuid, %(prompt_tokens)s, %(completion_tokens)s, %(usd)s, %(n_completed)s, 1 - %(n_completed)s,
           %(now)s
    FROM result WHERE %(agent)s::uuid IS NOT NULL
    ON CONFLICT (agent_id) DO UPDATE
    SET prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
        cost_usd = u.cost_usd + EXCLUDED.cost_usd, steps_completed = u.steps_completed + EXCLUDED.steps_completed,
        steps_failed = u.steps_failed + EXCLUDED.steps_failed, updated_at = EXCLUDED.updated_at
)"""

# Plain SQL, the whole of a completion in one statement: a report's (the step `in_progress` under the sender's
# live lease) or a person's approval (the step `ready`). It runs after the step and its dependents were locked in
# id order (lock order rule 2): for a report, by `lock_order.LOCK_STEP_AND_DEPENDENTS_SQL` sent together with it
# (`lock_order.run_after_lock`) or by the transaction path's `locked_step`; so it reads them, and what was
# committed under their locks (a lock taken under the step, a dependent un-skipped by a retry), as they are once
# locked. Every write below is joined to `step`, the UPDATE that applies only when `{step_guard}` holds, so when
# it does not nothing at all is written and no row comes back (a report then takes the full path: a repeated
# report's answer, a stale lease, a 403). In order: the step, its attempt and reasoning iterations, the
# dependents it releases (with their NOTIFY), its file locks (with theirs, and one `locks.released` event per
# holder), the workflow's counters and spend (a `WorkflowDelta`: the workflow row is read, never locked), the
# status to answer (`settled`: probed from the steps, counted only when it may change), the events (numbered by the
# database), the `Result` with the answer a repeated report gets, and the agent's usage (the last lock).
_COMPLETE_SQL = """
WITH step AS (
    -- `held`: the row as it was (the lease's attempt, which the update clears).
    UPDATE coordination_step s
    SET status = 'completed', final_result = %(final_result)s, outputs = %(outputs)s::jsonb, error = '',
        finished_at = %(now)s, lease_agent_id = NULL, lease_expires_at = NULL, lease_attempt_id = NULL,
        updated_at = %(now)s
    FROM coordination_step held
    WHERE s.id = %(step)s AND held.id = s.id AND {step_guard}
    RETURNING s.id, s.key, s.role, s.workflow_id, held.lease_attempt_id
), attempt AS (
    -- By its primary key: an agent's attempts are never scanned.
    UPDATE coordination_attempt a SET ended_at = %(now)s, outcome = 'completed'
    FROM step
    WHERE a.step_id = step.id AND {attempt_match}
    RETURNING a.id, a.number, a.started_at
), iterations AS (
    {iterations_insert}
), released AS (
    UPDATE coordination_step s
    SET remaining_deps = s.remaining_deps - 1,
        status = CASE WHEN s.remaining_deps = 1 THEN 'ready' ELSE s.status END,
        available_at = CASE WHEN s.remaining_deps = 1 THEN %(now)s ELSE s.available_at END,
        updated_at = %(now)s
    FROM coordination_stepdependency e, step
    WHERE e.depends_on_id = step.id AND s.id = e.step_id AND s.status = 'pending'
    RETURNING s.key, s.status, s.role
), ready AS (
    SELECT coalesce(array_agg(key ORDER BY key), '{{}}') AS released_keys, count(*) AS n_released,
           coalesce((SELECT array_agg(role || ':' || n) FROM (SELECT role, count(*) AS n FROM released
                                                               WHERE status = 'ready' GROUP BY role) AS per_role),
                    '{{}}') AS released_roles
    FROM released WHERE status = 'ready'
), locks AS (
    UPDATE coordination_filelock l
    SET released_at = LEAST(clock_timestamp(), l.expires_at), release_reason = 'completed'
    FROM step
    WHERE l.step_id = step.id AND l.released_at IS NULL
    RETURNING l.project_id, l.agent_id, l.path, l.mode, l.fencing
), lock_groups AS (
    -- One `locks.released` event per holder, as `file_locks.record_locks_released` records them.
    SELECT agent_id, row_number() OVER (ORDER BY agent_id) AS n,
           jsonb_agg(jsonb_build_object('path', path, 'mode', mode, 'fencing', fencing) ORDER BY path) AS locks
    FROM locks GROUP BY agent_id
), locks_done AS (
    SELECT count(*) AS n FROM lock_groups
), delta AS (
    -- The counters and spend move by a delta row: the workflow row is not locked (`workflow_counters`). Joined
    -- with `locks_done`, so the step's file locks are taken first.
    INSERT INTO coordination_workflowdelta (workflow_id, {delta_columns}, spent_usd, spent_tokens, at)
    SELECT step.workflow_id, {delta_values}, %(usd)s, %(tokens)s, %(now)s
    FROM step, ready, locks_done
    RETURNING {delta_columns}, spent_usd, spent_tokens
), probe AS (
    -- Whether anything else is ready or running in the workflow (this step's own change is not visible here).
    SELECT EXISTS (SELECT 1 FROM coordination_step o
                   WHERE o.workflow_id = step.workflow_id AND o.status = 'ready' AND o.id <> step.id
                     AND o.role <> 'human') AS ready,
           EXISTS (SELECT 1 FROM coordination_step o
                   WHERE o.workflow_id = step.workflow_id AND o.status = 'in_progress' AND o.id <> step.id) AS running
    FROM step
), wf AS (
    -- `may_settle`: nothing released, nothing else ready or running, or a budget to check; `quiet`: nothing
    -- released and no other step ready for an agent, so the steps still running or awaiting a person's decision
    -- (reported or decided concurrently) may be the last.
    SELECT w.id, w.status, w.total_steps, w.budget_usd, w.budget_tokens, ready.released_keys, ready.released_roles,
           ready.n_released,
           (ready.n_released = 0 AND NOT probe.ready AND NOT probe.running)
           OR w.budget_usd IS NOT NULL OR w.budget_tokens IS NOT NULL AS may_settle,
           ready.n_released = 0 AND NOT probe.ready AS quiet
    FROM coordination_workflow w, step, ready, probe
    WHERE w.id = step.workflow_id
), sums AS (
    -- Only then the live figures are needed: the committed deltas (one lookup, skipped when it may not settle).
    SELECT {delta_sums} FROM coordination_workflowdelta d
    WHERE d.workflow_id = (SELECT id FROM wf WHERE may_settle)
), workflow AS (
    SELECT wf.id, wf.status, wf.total_steps, wf.budget_usd, wf.budget_tokens, wf.released_keys, wf.released_roles,
           wf.n_released, wf.may_settle, wf.quiet, {live_columns}
    FROM wf JOIN coordination_workflow b ON b.id = wf.id, sums, delta
), settled AS (
    SELECT CASE WHEN w.may_settle THEN {settled_status} ELSE w.status END AS status FROM workflow w
), events AS (
    INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
    SELECT w.id, 'step.completed', step.id, %(agent)s::uuid,
           jsonb_build_object('step', step.key) || %(actor)s::jsonb
           || jsonb_build_object('attempt', attempt.number, 'status', 'completed'), %(now)s
    FROM workflow w, step, attempt
    UNION ALL
    SELECT w.id, 'steps.released', NULL, NULL,
           jsonb_build_object('steps', to_jsonb(w.released_keys), 'by', step.key), %(now)s
    FROM workflow w, step WHERE w.n_released > 0
    UNION ALL
    SELECT w.id, 'locks.released', step.id, g.agent_id,
           jsonb_build_object('reason', 'completed', 'locks', g.locks), %(now)s
    FROM workflow w, step, lock_groups g
    RETURNING id, seq, kind, step_id, agent_id, data
), result AS (
    INSERT INTO coordination_result (id, attempt_id, step_id, status, final_result, outputs, error, retryable, model,
                                     prompt_tokens, completion_tokens, cost_usd, execution_time_s, response, created_at)
    SELECT %(result)s, attempt.id, step.id, 'completed', %(final_result)s, %(outputs)s::jsonb, '', false, %(model)s,
           %(prompt_tokens)s, %(completion_tokens)s, %(usd)s, %(execution_time_s)s,
           jsonb_build_object('step_id', step.id::text, 'status', 'completed', 'workflow_status', settled.status,
                              'released', to_jsonb(w.released_keys)),
           %(now)s
    FROM workflow w, settled, step, attempt
    RETURNING id
), {usage_cte}
SELECT w.*, settled.status AS settled_status, step.key AS step_key, step.role AS step_role,
       attempt.id AS attempt_id, attempt.number AS attempt_number, attempt.started_at AS attempt_started_at,
       (SELECT count(pg_notify('{ready_channel}', r)) FROM unnest(w.released_roles) AS r) AS ready_notified,
       (SELECT count(pg_notify('{locks_channel}', p)) FROM (SELECT DISTINCT project_id::text AS p FROM locks) AS lp)
           AS locks_notified,
       (SELECT json_agg(json_build_object('id', id, 'seq', seq, 'kind', kind, 'step_id', step_id,
                                          'agent_id', agent_id, 'data', data) ORDER BY seq) FROM events) AS events
FROM workflow w, settled, step, attempt, result
"""


def _completion_sql(from_status: str, *, step_guard: str, attempt_match: str) -> str:
    moves = {column: "0" for column in COUNTER_COLUMNS}
    moves[STEP_COUNTER_FIELDS[from_status]] = "-1"
    moves[STEP_COUNTER_FIELDS[StepStatus.COMPLETED]] = "1"
    moves[STEP_COUNTER_FIELDS[StepStatus.PENDING]] = "- ready.n_released"
    moves[STEP_COUNTER_FIELDS[StepStatus.READY]] = ("ready.n_released - 1" if from_status == StepStatus.READY
                                                    else "ready.n_released")
    return _COMPLETE_SQL.format(
        step_guard=step_guard,
        attempt_match=attempt_match,
        delta_columns=", ".join(COUNTER_COLUMNS),
        delta_values=", ".join(moves[column] for column in COUNTER_COLUMNS),
        # (sum() of a bigint is numeric: the tokens are cast back.)
        delta_sums=", ".join(f"sum(d.{field}){'::bigint' if field == 'spent_tokens' else ''} AS {field}"
                             for field in LIVE_FIELDS),
        live_columns=", ".join(f"b.{field} + coalesce(sums.{field}, 0) + delta.{field} AS {field}"
                               for field in LIVE_FIELDS),
        settled_status=SETTLED_STATUS_SQL,
        ready_channel=notify.STEP_READY,
        locks_channel=notify.LOCKS,
        usage_cte=USAGE_CTE.strip(),
        iterations_insert=leases.insert_iterations_sql("attempt.id", joined="attempt"),
    )


# A report completes an `in_progress` step under the sender's live lease, and the attempt its token belongs to
# (the grant stores both hashes together); a person's approval completes a `ready` step and the attempt made for it.
COMPLETE_SQL = {
    StepStatus.IN_PROGRESS: _completion_sql(
        StepStatus.IN_PROGRESS,
        step_guard=("s.status = 'in_progress' AND s.lease_agent_id = %(agent)s AND s.lease_token_hash = %(hash)s "
                    "AND s.lease_expires_at > %(now)s"),
        attempt_match="a.id = step.lease_attempt_id AND a.lease_token_hash = %(hash)s AND a.agent_id = %(agent)s"),
    StepStatus.READY: _completion_sql(StepStatus.READY, step_guard="s.status = 'ready'",
                                      attempt_match="a.id = %(attempt)s"),
}

# Plain SQL: a finished step's `Result` and its events (from arrays) in one round trip.
EVENTS_AND_RESULT_SQL = """
WITH result AS (
    INSERT INTO coordination_result (id, attempt_id, step_id, status, final_result, outputs, error, retryable, model,
                                     prompt_tokens, completion_tokens, cost_usd, execution_time_s, response, created_at)
    VALUES (%(id)s, %(attempt)s, %(step)s, %(status)s, %(final_result)s, %(outputs)s::jsonb, %(error)s, %(retryable)s,
            %(model)s, %(prompt_tokens)s, %(completion_tokens)s, %(cost_usd)s, %(execution_time_s)s,
            %(response)s::jsonb, %(now)s)
    RETURNING id
), """ + USAGE_CTE.strip() + """
INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
SELECT %(workflow)s, u.kind, u.step_id, u.agent_id, u.data, %(now)s
FROM unnest(%(kinds)s::text[], %(step_ids)s::uuid[], %(agent_ids)s::uuid[], %(datas)s::jsonb[])
     WITH ORDINALITY AS u(kind, step_id, agent_id, data, n), result
ORDER BY u.n
RETURNING id, seq
"""


@dataclass
class Outcome:
    status: str  # "completed" or "failed"
    final_result: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    iterations: list[IterationIn] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    execution_time_s: float | None = None
    error: str = ""
    retryable: bool = False


def step_report(*, step_id: UUID, agent: Agent, lease_token: str, outcome: Outcome) -> dict[str, Any]:
    """Apply a worker's result; release dependents whose last dependency this was.

    Only the current lease's holder may report; a stale report is refused with
    `StaleLease` and recorded as an event (in its own transaction), never applied.
    A repeated report of an applied result returns the first answer and changes
    nothing. The work done depends on the step's own dependents, never on the
    size of the workflow.
    """
    if outcome.status == StepStatus.COMPLETED:
        answer = _report_completed_at_once(step_id=step_id, agent=agent, lease_token=lease_token, outcome=outcome)
        if answer is not None:
            return answer
    try:
        return _step_report(step_id=step_id, agent=agent, lease_token=lease_token, outcome=outcome)
    except StaleLease as exc:
        step = Step.objects.filter(id=step_id).only("id", "key", "workflow_id").first()
        if step is not None:
            with transaction.atomic():
                event_log.event_record(kind="step.stale_report", workflow_id=step.workflow_id, step_id=step.id,
                                       agent_id=agent.id,
                                       data={"step": step.key, "status": outcome.status, "agent": agent.name,
                                             "step_status": exc.extra.get("step_status")})
        raise


def _report_completed_at_once(*, step_id: UUID, agent: Agent, lease_token: str, outcome: Outcome) -> dict[str, Any] | None:
    """A completed report from the live lease's holder, applied by one statement (`COMPLETE_SQL`) sent with the
    locks of its step and dependents: the common case of a report costs one round trip.

    None when it did not apply (not the live lease's holder, a repeated report, or
    PostgreSQL refused it for a conflict): nothing was written, and the caller takes
    the full path, which tells those cases apart. When the workflow may be settling
    (finished, or paused over its budget), or only its last steps are left, it is
    settled in a transaction of its own right after, decided again there from the
    counters (`workflow_control.workflow_settle`; the sweep settles a workflow whose
    process died in between). Now and then it folds the workflow's deltas instead.
    """
    completed = lock_order.unless_conflict(functools.partial(
        _complete, step_id=step_id, from_status=StepStatus.IN_PROGRESS, outcome=outcome, agent_id=agent.id,
        actor={"agent": agent.name}, now=timezone.now(), lease_hash=tokens.token_hash(lease_token or ""),
        locked=False))
    if completed is None:
        return None
    response, workflow_id, settles = completed
    if settles:
        _settle_after_commit(workflow_id, step_id)
    elif random.random() < FOLD_SHARE:
        try:
            workflow_fold([workflow_id])
        except OperationalError:
            logger.warning("Could not fold workflow %s's counters now; the sweep will.", workflow_id, exc_info=True)
    return response


def _settle_after_commit(workflow_id: UUID, step_id: UUID) -> None:
    """Settle the workflow after a completion committed (`workflow_control.workflow_settle`, which folds its
    deltas in and decides under its lock). The completion stands whatever happens here: if settling fails, the
    sweep settles the workflow (`workflows_settle_sweep`)."""
    try:
        workflow_control.workflow_settle(workflow_id=workflow_id)
    except (ServiceError, OperationalError):
        logger.warning("Workflow %s was not settled after step %s's completion; the sweep will settle it.",
                       workflow_id, step_id, exc_info=True)
    except DatabaseError:
        # Not a busy or absent database: a refusal that says something is wrong. The completion is committed
        # and is answered as such; the sweep tries the settling again.
        logger.exception("Settling workflow %s after step %s's completion was refused.", workflow_id, step_id)


def _complete(*, step_id: UUID, from_status: str, outcome: Outcome, agent_id: UUID | None, actor: dict[str, Any],
              now: datetime, lease_hash: str = "", attempt_id: UUID | None = None,
              locked: bool) -> tuple[dict[str, Any], UUID, bool] | None:
    """Run `COMPLETE_SQL[from_status]`; publish its events and the attempt's span. Returns the answer, the
    workflow's id and whether the workflow must now settle (finished, or paused over its budget); None when
    the step's guard did not hold (nothing written).

    `locked`: the caller's transaction holds the step and its dependents; else they are locked by a statement
    sent with it (`lock_order.run_after_lock`), in a transaction of its own unless the caller has one.
    """
    usage = outcome.usage
    params = {
        "now": now, "step": step_id, "agent": agent_id, "hash": lease_hash, "attempt": attempt_id,
        "actor": json.dumps(actor), "result": uuid4(),
        "final_result": outcome.final_result, "outputs": json.dumps(outcome.outputs),
        "usd": usage.cost_usd, "tokens": usage.prompt_tokens + usage.completion_tokens, "model": usage.model,
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "execution_time_s": outcome.execution_time_s, "n_completed": 1, **leases.iteration_params(outcome.iterations),
    }
    if locked:
        with connection.cursor() as cursor:
            cursor.execute(COMPLETE_SQL[from_status], params)
            found = rows.fetch_all_named(cursor)
    else:
        found = lock_order.run_after_lock(lock_order.LOCK_STEP_AND_DEPENDENTS_SQL, {"step": step_id},
                                          COMPLETE_SQL[from_status], params)
    if not found:
        return None
    row = found[0]
    workflow_id = row["id"]
    for item in rows.json_value(row["events"]):
        event = Event(id=item["id"], workflow_id=workflow_id, seq=item["seq"], kind=item["kind"],
                      step_id=item["step_id"], agent_id=item["agent_id"], data=item["data"], at=now)
        inserted_event_published(event)
    answer_status = row["settled_status"]
    response = {"step_id": str(step_id), "status": StepStatus.COMPLETED, "workflow_status": answer_status,
                "released": list(row["released_keys"])}
    step = Step(id=step_id, workflow_id=workflow_id, key=row["step_key"], role=row["step_role"])
    attempt = Attempt(id=row["attempt_id"], step_id=step_id, agent_id=agent_id, number=row["attempt_number"],
                      started_at=row["attempt_started_at"], ended_at=now, outcome=AttemptOutcome.COMPLETED)
    tracing.attempt_ended(step=step, attempt=attempt, agent_name=actor.get("agent"))
    # The answer counts what committed before this statement. Reports of the last steps, applied concurrently,
    # may each see the others still running: each of them (`quiet`: nothing else ready) settles after its commit,
    # where every committed change is counted, so the last one to commit finishes the workflow.
    return response, workflow_id, answer_status != row["status"] or row["quiet"]


@lock_order.retrying
def _step_report(*, step_id: UUID, agent: Agent, lease_token: str, outcome: Outcome) -> dict[str, Any]:
    now = timezone.now()
    hashed = tokens.token_hash(lease_token or "")
    along = Along.DEPENDENTS if outcome.status == StepStatus.COMPLETED else Along.DOWNSTREAM
    step = lock_order.locked_step(step_id, along=along, replay_for=(hashed, agent.id))
    if step.replay is not None:
        return step.replay
    try:
        attempt = leases.held_attempt(step, agent, lease_token)
    except StaleLease:
        # A report of the same lease may have committed while this one waited for the step's lock
        # (the statement's snapshot predates it): look again.
        replay = Result.objects.filter(step=step, attempt__lease_token_hash=hashed, attempt__agent=agent).first()
        if replay is not None:
            return replay.response
        raise
    if not leases.lease_live(step, now):
        ended = "expired" if step.status == StepStatus.IN_PROGRESS else step.status
        raise StaleLease(
            f"The lease on step {step.key!r} ended ({ended}); the result was not applied.", step_status=step.status
        )
    if outcome.status != StepStatus.COMPLETED:
        leases.store_iterations(attempt, outcome.iterations)  # a completion stores them in its statement
    return finish_step(step=step, attempt=attempt, outcome=outcome, now=now, from_status=StepStatus.IN_PROGRESS,
                       actor={"agent": agent.name}, agent_id=agent.id)


def finish_step(*, step: Step, attempt: Attempt, outcome: Outcome, now: datetime, from_status: str,
                actor: dict[str, Any], agent_id: UUID | None) -> dict[str, Any]:
    """Apply an outcome to a step the caller has locked with what it may change (`Along.DEPENDENTS` for a
    completion, `Along.DOWNSTREAM` for a failure): an agent's report, or a person's decision."""
    step.lease_agent = None
    step.lease_expires_at = None
    step.lease_attempt = None
    if outcome.status == StepStatus.COMPLETED:
        completed = _complete(step_id=step.id, from_status=from_status, outcome=outcome, agent_id=agent_id,
                              actor=actor, now=now, lease_hash=step.lease_token_hash, attempt_id=attempt.id,
                              locked=True)
        if completed is None:
            raise AssertionError(f"step {step.id} changed under its lock")  # the caller checked, under the lock
        response, workflow_id, settles = completed
        if settles:
            # After the commit, in a transaction of its own: the usage row is locked already, and the workflow
            # row comes before it in the lock order.
            transaction.on_commit(functools.partial(_settle_after_commit, workflow_id, step.id))
        return response
    else:
        usage = outcome.usage
        moves: dict[str, int] = {from_status: -1}
        leases.end_attempt(attempt, AttemptOutcome.RETRY if outcome.retryable else AttemptOutcome.FAILED, now)
        new_status, skipped, _ = leases.requeue_or_fail(
            step=step, now=now, charge=True, error=outcome.error or "Reported failed.", final=not outcome.retryable
        )
        add(moves, new_status, 1)
        add(moves, StepStatus.PENDING, -len(skipped))
        add(moves, StepStatus.SKIPPED, len(skipped))
        file_locks.lock_release_for_step(step=step, reason=outcome.status)
        snapshot = workflow_move(step.workflow_id, moves, spent_usd=usage.cost_usd,
                                 spent_tokens=usage.prompt_tokens + usage.completion_tokens)
        data = {**actor, "attempt": attempt.number, "status": step.status, "error": outcome.error[:500]}
        if step.status == StepStatus.READY:
            data["available_at"] = step.available_at.isoformat()
        kind = "step.retrying" if new_status == StepStatus.READY else "step.failed"
        events = [new_event(kind, workflow_id=step.workflow_id, step=step, agent_id=agent_id, data=data)]
        if skipped:
            events.append(new_event("steps.skipped", workflow_id=step.workflow_id,
                                    data={"steps": skipped, "after": step.key}))
        answer_status, pause_reason = workflow_after(snapshot)
        response = {"step_id": str(step.id), "status": step.status, "workflow_status": answer_status,
                    "released": []}
        _insert_events_and_result(events, step=step, attempt=attempt, outcome=outcome, response=response, now=now)
    tracing.attempt_ended(step=step, attempt=attempt, agent_name=actor.get("agent"), error=outcome.error)
    # What the workflow became is in the answer already; these writes make it so, after the step's own events.
    settle_workflow(snapshot)
    if pause_reason:
        # Running agents learn it from their next heartbeat (cancel: true).
        workflow_control.workflow_pause(workflow_id=step.workflow_id, reason=pause_reason)
    return response


def _insert_events_and_result(events: list[Event], *, step: Step, attempt: Attempt, outcome: Outcome,
                              response: dict[str, Any], now: datetime) -> None:
    """Store a finished step's events and its `Result` (the answer a repeated report gets) in one statement."""
    usage = outcome.usage
    with connection.cursor() as cursor:
        cursor.execute(EVENTS_AND_RESULT_SQL, {
            "id": uuid4(), "attempt": attempt.id, "step": step.id, "status": outcome.status,
            "final_result": outcome.final_result, "outputs": json.dumps(outcome.outputs), "error": outcome.error,
            "retryable": outcome.retryable, "model": usage.model, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "cost_usd": usage.cost_usd, "usd": usage.cost_usd,
            "agent": attempt.agent_id, "n_completed": 0,
            "execution_time_s": outcome.execution_time_s, "response": json.dumps(response), "now": now,
            "workflow": step.workflow_id,
            "kinds": [event.kind for event in events], "step_ids": [event.step_id for event in events],
            "agent_ids": [event.agent_id for event in events],
            "datas": [json.dumps(event.data) for event in events],
        })
        inserted = sorted((row["seq"], row["id"]) for row in rows.fetch_all_named(cursor))
    for event, (seq, event_id) in zip(events, inserted, strict=True):  # numbered in list order
        event.id, event.seq, event.at = event_id, seq, now
        inserted_event_published(event)


@lock_order.retrying
def step_decide(*, step_id: UUID, user: AbstractBaseUser, approve: bool, comment: str = "") -> dict[str, Any]:
    """A person approves or rejects an approval step (role `human`), through the same path as a report."""
    now = timezone.now()
    step = lock_order.locked_step(step_id, along=Along.DEPENDENTS if approve else Along.DOWNSTREAM)
    if step.role != HUMAN_ROLE:
        raise InvalidState(f"Step {step.key!r} is for role {step.role!r}; only '{HUMAN_ROLE}' steps are decided here.")
    if step.status != StepStatus.READY:
        raise InvalidState(f"Step {step.key!r} is {step.status}; it can be decided once it is ready.")
    if step.workflow.status != WorkflowStatus.RUNNING:
        raise InvalidState(f"Workflow {step.workflow.name!r} is {step.workflow.status}; resume it first.")
    attempt = Attempt.objects.create(
        step=step, agent=None, number=step.attempt + 1,
        lease_token_hash=tokens.token_hash(secrets.token_urlsafe(16)), expires_at=now,
    )
    step.attempt = attempt.number
    step.save(update_fields=["attempt", "updated_at"])
    who = user.get_username()
    text = comment.strip()
    outcome = Outcome(
        status=StepStatus.COMPLETED if approve else StepStatus.FAILED,
        final_result=(f"Approved by {who}" + (f": {text}" if text else ".")) if approve else "",
        outputs={"decision": "approved" if approve else "rejected", "by": who, "comment": text},
        error="" if approve else f"Rejected by {who}" + (f": {text}" if text else "."),
        retryable=False,
    )
    return finish_step(step=step, attempt=attempt, outcome=outcome, now=now, from_status=StepStatus.READY,
                       actor={"by_user": who, "decision": outcome.outputs["decision"]}, agent_id=None)
