"""Pulling work: an agent leases the best ready step of its roles, at once or after a long-poll.

One protocol for every worker: the REST pull (`GET /v1/tasks/{role}/ready`) and
the MCP tools `pull_step` and `list_ready` call these functions.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable
from uuid import UUID, uuid4

from django.db import OperationalError, connection
from django.utils import timezone

from coordination import notify, rows
from coordination.errors import AtCapacity, Conflict, InvalidRequest
from coordination.events import inserted_event_published
from coordination.models import Agent, Attempt, Event, FileLock, Project, Step, StepStatus, Workflow
from coordination.services import agent_registry, file_locks, lock_order, tokens

MAX_WAIT_S = 30
# How many ready steps a pull may pass over because their files are locked.
MAX_LOCK_BLOCKED_CANDIDATES = 25
MAX_LISTED = 50
# The most steps one batch pull (`?max=N`) may lease.
MAX_BATCH = 50


@dataclass
class Lease:
    step: Step
    attempt: Attempt
    token: str
    inputs: dict[str, Any]
    # The locks granted with the lease for the step's declared files (their fencing numbers allow writing).
    locks: list[FileLock] = field(default_factory=list)

    @property
    def expires_at(self) -> datetime:
        return self.step.lease_expires_at


@dataclass
class PullMiss:
    """No step was handed out.

    `next_available_at`: when a backed-off step becomes ready, if any.
    `blocked_projects`: projects whose ready steps were passed over because
    their declared files are locked; a lock released there is worth a re-check.
    """

    next_available_at: datetime | None
    blocked_projects: set[UUID] = field(default_factory=set)


# The best ready steps of the roles (`role_condition`), best first, claimed with `FOR UPDATE SKIP LOCKED`, with
# what the lease answer needs: the workflow's and project's names and the dependencies' results. Each claim
# gives its own `gate` (a condition evaluated once, before the scan) and `limit`.
_READY_STEPS = """
    SELECT {select_list},
           w.name AS workflow_name, w.project_id AS project_id, p.name AS project_name,
           (SELECT coalesce(json_agg(json_build_array(d.key, d.final_result, d.outputs) ORDER BY d.key), '[]')
            FROM coordination_stepdependency e JOIN coordination_step d ON d.id = e.depends_on_id
            WHERE e.step_id = s.id) AS dep_results
    FROM coordination_step s
    JOIN coordination_workflow w ON w.id = s.workflow_id
    JOIN coordination_project p ON p.id = w.project_id
    WHERE {gate}
      AND s.status = 'ready' AND {role_condition} AND s.role <> 'human' AND s.available_at <= %(now)s
      AND w.status = 'running'
    ORDER BY s.workflow_priority DESC, s.priority DESC, s.available_at ASC
    LIMIT {limit}
    FOR UPDATE OF s SKIP LOCKED"""

ROLE_CONDITIONS = {"one": "s.role = %(role)s", "several": "s.role = ANY(%(roles)s::text[])"}

# Plain SQL, the transaction path's claim (`_steps_pull_locked`): the capacity check and the claim. It runs after
# the agent's row is locked, so its snapshot sees every lease the agent was granted before (and the ones granted
# earlier in this transaction, by a batch). The claim takes the best ready steps with `FOR UPDATE SKIP LOCKED`
# (concurrent pulls never get the same one, and never wait), as many as asked for and never more than the
# agent's free capacity (the LIMIT's subquery). One role (the usual pull) reads the ready-queue index in order
# and stops at the first unlocked rows; several roles merge their queues (a sort of their ready steps). With
# nothing claimed it still answers one row: the steps held.
_CLAIM_SQL = """
SELECT held.n AS held, c.*
FROM (SELECT count(*) AS n FROM coordination_step
      WHERE lease_agent_id = %(agent)s AND status = 'in_progress') AS held
LEFT JOIN LATERAL ({ready_steps}
) AS c ON true
"""


def _claim_sql(roles: str) -> str:
    return _CLAIM_SQL.format(ready_steps=_READY_STEPS.format(
        select_list=rows.select_list(Step, "s"), role_condition=ROLE_CONDITIONS[roles],
        gate="held.n < %(capacity)s AND NOT (s.id = ANY(%(passed_over)s::uuid[]))",
        limit=("(SELECT greatest(least(%(count)s, %(capacity)s - count(*)), 0) FROM coordination_step "
               "WHERE lease_agent_id = %(agent)s AND status = 'in_progress')")))


CLAIM_ONE_ROLE_SQL = _claim_sql("one")
CLAIM_ROLES_SQL = _claim_sql("several")

# Plain SQL: a min() over a join, read as one value.
NEXT_AVAILABLE_SQL = """
SELECT min(s.available_at) AS next_available_at FROM coordination_step s
JOIN coordination_workflow w ON w.id = s.workflow_id
WHERE s.status = 'ready' AND s.role = ANY(%(roles)s::text[]) AND s.available_at > %(now)s AND w.status = 'running'
"""

# Plain SQL, one round trip on every grant: the attempt, the step's lease, the counters and the event.
GRANT_SQL = """
WITH attempt AS (
    INSERT INTO coordination_attempt (id, step_id, agent_id, number, lease_token_hash, idempotency_key, started_at,
                                      expires_at, ended_at, outcome)
    VALUES (%(attempt)s, %(step)s, %(agent)s, %(number)s, %(hash)s, %(key)s, %(now)s, %(expires)s, NULL, '')
    RETURNING id
), step AS (
    UPDATE coordination_step
    SET status = 'in_progress', attempt = %(number)s, lease_agent_id = %(agent)s, lease_token_hash = %(hash)s,
        lease_expires_at = %(expires)s, lease_attempt_id = %(attempt)s, started_at = coalesce(started_at, %(now)s),
        updated_at = %(now)s
    WHERE id = %(step)s
    RETURNING started_at
), delta AS (
    INSERT INTO coordination_workflowdelta (workflow_id, n_ready, n_in_progress, at)
    SELECT %(workflow)s, -1, 1, %(now)s FROM step
    RETURNING id
)
INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
SELECT %(workflow)s, 'step.leased', %(step)s, %(agent)s, %(data)s::jsonb, %(now)s
FROM delta, step, attempt
RETURNING id AS event_id, seq, (SELECT started_at FROM step) AS started_at
"""


# Plain SQL, a whole pull in one statement run on its own (no BEGIN, no COMMIT: one round trip). In order:
# 1. the agent's row is locked by bumping its `pull_seq`, and `fresh` says whether the value locked is the one
#    this statement's snapshot saw: if another pull of the agent committed in between, the steps counted as
#    held below (read in the snapshot) may miss its leases, so nothing is claimed and the caller pulls again
#    in a transaction (`_steps_pull_locked`, which locks the agent first and counts after);
# 2. the claim (`_READY_STEPS`, gated on `fresh`, so it runs after the agent's lock);
# 3. when no claimed step declares files (their locks need `file_locks`' decisions, made in Python), the
#    grant of every claimed step, as `GRANT_SQL` does one: attempts (their ids and token hashes made by the
#    caller, one per position `i` in best-first order), the steps' leases, a counter delta per workflow (no
#    workflow row is locked), and the `step.leased` events.
# With nothing claimed it still answers one row: `fresh` and the steps held.
_PULL_AT_ONCE_SQL = """
WITH snap AS (
    SELECT pull_seq FROM coordination_agent WHERE id = %(agent)s
), agent AS (
    UPDATE coordination_agent a SET pull_seq = a.pull_seq + 1 WHERE a.id = %(agent)s
    RETURNING a.pull_seq = (SELECT pull_seq FROM snap) + 1 AS fresh
), held AS (
    SELECT count(*) AS n FROM coordination_step WHERE lease_agent_id = %(agent)s AND status = 'in_progress'
), key_used AS (
    -- A retried Idempotency-Key whose first pull committed after the caller looked: its leases are answered by
    -- `_steps_pull_locked` (a commit after this snapshot makes `fresh` false anyway).
    SELECT %(key)s <> '' AND EXISTS (SELECT 1 FROM coordination_attempt
                                     WHERE agent_id = %(agent)s AND idempotency_key = %(key)s) AS used
), claimed AS MATERIALIZED (
    SELECT c.*, row_number() OVER (ORDER BY c.s__workflow_priority DESC, c.s__priority DESC, c.s__available_at,
                                            c.s__id) AS i
    FROM ({ready_steps}
    ) AS c
), grants AS MATERIALIZED (
    SELECT c.s__id AS step_id, c.s__workflow_id AS workflow_id, c.s__key AS key, c.i, c.s__attempt + 1 AS number,
           (%(attempts)s::uuid[])[c.i] AS attempt_id, (%(hashes)s::text[])[c.i] AS hash,
           %(now)s::timestamptz + make_interval(secs => c.s__lease_ttl_s) AS expires_at
    FROM claimed c
    WHERE NOT EXISTS (SELECT 1 FROM claimed f WHERE f.s__files <> '[]'::jsonb)
), attempts AS (
    INSERT INTO coordination_attempt (id, step_id, agent_id, number, lease_token_hash, idempotency_key, started_at,
                                      expires_at, ended_at, outcome)
    SELECT g.attempt_id, g.step_id, %(agent)s, g.number, g.hash, %(key)s, %(now)s, g.expires_at, NULL, ''
    FROM grants g
    RETURNING id
), leased AS (
    UPDATE coordination_step s
    SET status = 'in_progress', attempt = g.number, lease_agent_id = %(agent)s, lease_token_hash = g.hash,
        lease_expires_at = g.expires_at, lease_attempt_id = g.attempt_id, started_at = coalesce(s.started_at, %(now)s),
        updated_at = %(now)s
    FROM grants g
    WHERE s.id = g.step_id AND EXISTS (SELECT 1 FROM attempts)
    RETURNING s.id, s.started_at
), deltas AS (
    INSERT INTO coordination_workflowdelta (workflow_id, n_ready, n_in_progress, at)
    SELECT workflow_id, -count(*), count(*), %(now)s FROM grants
    WHERE EXISTS (SELECT 1 FROM leased) GROUP BY workflow_id
    RETURNING workflow_id
), events AS (
    INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
    SELECT g.workflow_id, 'step.leased', g.step_id, %(agent)s,
           jsonb_build_object('step', g.key, 'agent', %(agent_name)s::text, 'attempt', g.number,
                              'expires_at', to_char(g.expires_at AT TIME ZONE 'UTC', %(iso_format)s)),
           %(now)s
    FROM (SELECT * FROM grants ORDER BY i) AS g
    WHERE EXISTS (SELECT 1 FROM leased)
    RETURNING id, seq, step_id, data
)
SELECT agent.fresh AND NOT key_used.used AS fresh, held.n AS held, c.*, g.attempt_id, g.number, g.expires_at,
       l.started_at AS leased_started_at, e.id AS event_id, e.seq AS event_seq, e.data AS event_data
FROM agent CROSS JOIN held CROSS JOIN key_used
LEFT JOIN claimed c ON true
LEFT JOIN grants g ON g.step_id = c.s__id
LEFT JOIN leased l ON l.id = c.s__id
LEFT JOIN events e ON e.step_id = c.s__id
ORDER BY c.i
"""


def _pull_at_once_sql(roles: str) -> str:
    return _PULL_AT_ONCE_SQL.format(ready_steps=_READY_STEPS.format(
        select_list=rows.select_list(Step, "s"), role_condition=ROLE_CONDITIONS[roles],
        gate="(SELECT fresh FROM agent) AND NOT (SELECT used FROM key_used)",
        limit="(SELECT greatest(least(%(count)s, %(capacity)s - held.n), 0) FROM held)"))


PULL_AT_ONCE_ONE_ROLE_SQL = _pull_at_once_sql("one")
PULL_AT_ONCE_ROLES_SQL = _pull_at_once_sql("several")


def parse_pull_roles(raw: str) -> list[str]:
    """The roles of a pull or a listing (`"developer,tester"`): slugs, de-duplicated, order kept."""
    return agent_registry.parse_roles(raw, registering=False)


def parse_wait(raw: Any) -> float:
    """Seconds to long-poll, 0 to `MAX_WAIT_S`; a string (a query parameter) or a number (an MCP argument)."""
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except (TypeError, ValueError):
        raise InvalidRequest(f"wait={raw!r} is not a number: give seconds from 0 to {MAX_WAIT_S}.") from None
    if not 0 <= wait <= MAX_WAIT_S:  # also refuses NaN
        raise InvalidRequest(f"wait={raw} is out of range: give seconds from 0 to {MAX_WAIT_S}.")
    return wait


def step_inputs(step: Step) -> dict[str, Any]:
    """The results of a step's dependencies, by key, plus what the server added (feedback)."""
    inputs: dict[str, Any] = {
        key: {"final_result": final_result, "outputs": outputs}
        for key, final_result, outputs in Step.objects.filter(downstream_edges__step_id=step.id)
        .order_by("key")
        .values_list("key", "final_result", "outputs")
    }
    inputs.update(step.extra_inputs or {})
    return inputs


def parse_max(raw: Any) -> int | None:
    """How many steps a batch pull may lease, 1 to `MAX_BATCH`, or None (the single-step pull)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit())):
        raise InvalidRequest(f"max={raw!r} is not a whole number: give how many steps to lease, 1 to {MAX_BATCH}.")
    count = int(raw)
    if not 1 <= count <= MAX_BATCH:
        raise InvalidRequest(f"max={raw} is out of range: give how many steps to lease, 1 to {MAX_BATCH}.")
    return count


def step_pull(*, agent: Agent, roles: list[str], idempotency_key: str = "") -> Lease | PullMiss:
    """Lease the best ready step of `roles` to `agent`, atomically (see `steps_pull`)."""
    result = steps_pull(agent=agent, roles=roles, count=1, idempotency_key=idempotency_key)
    return result[0] if isinstance(result, list) else result


def steps_pull(*, agent: Agent, roles: list[str], count: int = 1, idempotency_key: str = "") -> list[Lease] | PullMiss:
    """Lease up to `count` of the best ready steps of `roles` to `agent`, atomically, best first.

    1. A retried request (same `idempotency_key`) gets its open leases back.
    2. The agent row is locked, so its capacity check and grants are one step:
       never more leases than its free capacity (`AtCapacity` when it has none).
    3. The oldest ready steps of the highest priority are claimed with
       `FOR UPDATE SKIP LOCKED`: concurrent pulls never get the same step.
       A step whose declared files are held by others is passed over (and
       another claimed in its place, up to `MAX_LOCK_BLOCKED_CANDIDATES`).
    4. Each step moves to `in_progress` under a new `Attempt`; counters and the
       event log follow in the same transaction.

    The common pull (no declared files among the steps claimed, no other pull of
    the agent committing meanwhile) is one statement (`_pull_at_once`); the others
    run in a transaction (`_steps_pull_locked`).
    """
    agent_registry.check_roles(agent, roles)
    if idempotency_key:
        previous = _leases_of_key(agent=agent, idempotency_key=idempotency_key)
        if previous is not None:
            return previous[:count]
    result = _pull_at_once(agent=agent, roles=roles, count=count, idempotency_key=idempotency_key)
    if result is not None:
        return result
    return _steps_pull_locked(agent=agent, roles=roles, count=count, idempotency_key=idempotency_key)


def _pull_at_once(*, agent: Agent, roles: list[str], count: int, idempotency_key: str) -> list[Lease] | PullMiss | None:
    """A pull in one statement (`PULL_AT_ONCE_SQL`), or None when it could not decide alone and wrote nothing
    but the agent's `pull_seq`: another pull of the agent committed meanwhile, a claimed step declares files,
    the Idempotency-Key was used meanwhile, or PostgreSQL refused the statement for a conflict."""
    now = timezone.now()
    count = min(count, agent.capacity)
    attempt_ids = [uuid4() for _ in range(count)]
    lease_tokens = [tokens.lease_token_for(attempt_id) for attempt_id in attempt_ids]
    hashes = [tokens.token_hash(token) for token in lease_tokens]
    try:
        with connection.cursor() as cursor:
            cursor.execute(PULL_AT_ONCE_ONE_ROLE_SQL if len(roles) == 1 else PULL_AT_ONCE_ROLES_SQL, {
                "agent": agent.id, "agent_name": agent.name, "capacity": agent.capacity, "count": count,
                "role": roles[0], "roles": roles, "now": now, "key": idempotency_key,
                "attempts": attempt_ids, "hashes": hashes,
                "iso_format": _ISO_FORMAT if now.microsecond else _ISO_FORMAT_WHOLE_SECONDS,
            })
            claimed = rows.fetch_all_named(cursor)
    except OperationalError as exc:
        if connection.in_atomic_block or lock_order.conflict_reason(exc) is None:
            raise
        return None
    if not claimed or not claimed[0]["fresh"]:
        return None  # (no row: the agent's row is gone; the transaction's path says what that means)
    first = claimed[0]
    claimed = [row for row in claimed if row["s__id"] is not None]
    if not claimed:
        if first["held"] >= agent.capacity:
            raise AtCapacity(
                f"Agent {agent.name!r} holds {first['held']} step(s), its capacity; report or hand back one before "
                "pulling another.",
                held=first["held"],
                capacity=agent.capacity,
            )
        with connection.cursor() as cursor:
            cursor.execute(NEXT_AVAILABLE_SQL, {"roles": roles, "now": now})
            return PullMiss(next_available_at=rows.fetch_named(cursor)["next_available_at"])
    if any(row["attempt_id"] is None for row in claimed):
        return None  # a step declares files: its locks are decided in a transaction
    leases = []
    for row in claimed:
        step = _claimed_step(row)
        attempt = Attempt(id=row["attempt_id"], step=step, agent=agent, number=row["number"],
                          idempotency_key=idempotency_key, started_at=now, expires_at=row["expires_at"],
                          lease_token_hash=hashes[row["i"] - 1])
        attempt._state.adding = False
        leases.append(_leased(step=step, attempt=attempt, agent=agent, token=lease_tokens[row["i"] - 1], now=now,
                              started_at=row["leased_started_at"], dep_results=rows.json_value(row["dep_results"]),
                              event=Event(id=row["event_id"], workflow_id=step.workflow_id, seq=row["event_seq"],
                                          kind="step.leased", step_id=step.id, agent_id=agent.id,
                                          data=rows.json_value(row["event_data"]), at=now)))
    return leases


# `file_locks.iso` in SQL (`to_char`): Python leaves out the fraction of a whole second.
_ISO_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
_ISO_FORMAT_WHOLE_SECONDS = 'YYYY-MM-DD"T"HH24:MI:SS"Z"'


@lock_order.retrying
def _steps_pull_locked(*, agent: Agent, roles: list[str], count: int, idempotency_key: str) -> list[Lease] | PullMiss:
    """`steps_pull` in a transaction: the agent locked first, then everything read after it."""
    lock_order.lock_agent(agent.id)
    if idempotency_key:
        # Read under the agent's lock: a pull with this key that committed meanwhile is seen.
        previous = _leases_of_key(agent=agent, idempotency_key=idempotency_key)
        if previous is not None:
            return previous[:count]
    now = timezone.now()
    leases: list[Lease] = []
    passed_over: list[UUID] = []
    blocked_projects: set[UUID] = set()
    locked_projects: set[UUID] = set()
    with connection.cursor() as cursor:
        while len(leases) < count and len(passed_over) < MAX_LOCK_BLOCKED_CANDIDATES:
            cursor.execute(CLAIM_ONE_ROLE_SQL if len(roles) == 1 else CLAIM_ROLES_SQL, {
                "agent": agent.id, "capacity": agent.capacity, "count": count - len(leases), "role": roles[0],
                "roles": roles, "now": now, "passed_over": passed_over})
            claimed = rows.fetch_all_named(cursor)
            held = claimed[0]["held"]
            if held >= agent.capacity and not leases:
                raise AtCapacity(
                    f"Agent {agent.name!r} holds {held} step(s), its capacity; report or hand back one before "
                    "pulling another.",
                    held=held,
                    capacity=agent.capacity,
                )
            passed_before = len(passed_over)
            # Granted best first, ties by id: the event log's order and the answer's are one.
            claimed_steps = sorted(((step, row) for row in claimed if (step := _claimed_step(row)) is not None),
                                   key=lambda pair: _best_first(pair[0]))
            for step, row in claimed_steps:
                if step.files and _declared_files_blocked(step=step, agent=agent, locked_projects=locked_projects):
                    # Lock-aware scheduling: hand out another step rather than one that would wait.
                    passed_over.append(step.id)
                    blocked_projects.add(step.workflow.project_id)
                    continue
                leases.append(_grant(step=step, agent=agent, idempotency_key=idempotency_key, now=now,
                                     dep_results=rows.json_value(row["dep_results"])))
            if len(passed_over) == passed_before:
                break  # every claimed step was granted: fewer were ready than asked for, or the batch is full
        if leases:
            # Best first, ties by id: the order a retry with the same Idempotency-Key answers in.
            return sorted(leases, key=lambda lease: _best_first(lease.step))
        cursor.execute(NEXT_AVAILABLE_SQL, {"roles": roles, "now": now})
        next_available_at = rows.fetch_named(cursor)["next_available_at"]
    return PullMiss(next_available_at=next_available_at, blocked_projects=blocked_projects)


def _best_first(step: Step) -> tuple:
    return -step.workflow_priority, -step.priority, step.available_at, step.id


def _leases_of_key(*, agent: Agent, idempotency_key: str) -> list[Lease] | None:
    """The open leases a pull with this `Idempotency-Key` was granted, best first; None for a new key.

    A key whose leases have all ended is refused: reusing it for new work would hide a lost answer.
    """
    previous = list(
        Attempt.objects.select_related("step__workflow__project")
        .filter(agent=agent, idempotency_key=idempotency_key)
        .order_by("started_at")
    )
    if not previous:
        return None
    still_open = [attempt for attempt in previous
                  if attempt.ended_at is None and attempt.step.lease_attempt_id == attempt.id]
    if not still_open:
        keys = ", ".join(repr(attempt.step.key) for attempt in previous)
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} was used for step(s) {keys}, whose lease has ended; "
            "send a new key with every new pull.",
        )
    still_open.sort(key=lambda attempt: (attempt.started_at, _best_first(attempt.step)))
    return [
        Lease(step=attempt.step, attempt=attempt, token=tokens.lease_token_for(attempt.id),
              inputs=step_inputs(attempt.step),
              locks=list(FileLock.objects.filter(step=attempt.step, agent=agent,
                                                 released_at__isnull=True).order_by("path")))
        for attempt in still_open
    ]


def _claimed_step(row: dict[str, Any]) -> Step | None:
    """The Step of a claim row (with its workflow and project, names only), or None when nothing was claimed."""
    step = rows.from_named(Step, row, "s")
    if step is None:
        return None
    workflow = Workflow(id=step.workflow_id, name=row["workflow_name"], project_id=row["project_id"])
    workflow.project = Project(id=row["project_id"], name=row["project_name"])
    step.workflow = workflow
    return step


def _declared_files_blocked(*, step: Step, agent: Agent, locked_projects: set[UUID]) -> bool:
    """Whether a step's declared files are held by others (or queued for); takes the project's lock.

    The first project of a pull is waited for; another one is only tried (see
    `lock_order`): a project that is busy counts as blocked.
    """
    project_id = step.workflow.project_id
    if locked_projects and project_id not in locked_projects:
        if lock_order.try_lock_project(project_id) is None:
            return True
    else:
        lock_order.lock_project(project_id)
    locked_projects.add(project_id)
    return any(
        file_locks.lock_blockers(project_id=project_id, paths=paths, mode=mode, agent_id=agent.id, step_id=step.id,
                                 waiter_id=None)
        for mode, paths in file_locks.declared_files_by_mode(step).items()
    )


def _grant(*, step: Step, agent: Agent, idempotency_key: str, now: datetime, dep_results: list) -> Lease:
    """Lease a claimed step: its attempt, the step's lease, the counters and the event, in one statement."""
    attempt = Attempt(
        step=step,
        agent=agent,
        number=step.attempt + 1,
        idempotency_key=idempotency_key,
        started_at=now,
        expires_at=now + timedelta(seconds=step.lease_ttl_s),
    )
    token = tokens.lease_token_for(attempt.id)
    attempt.lease_token_hash = tokens.token_hash(token)
    data = {"step": step.key, "agent": agent.name, "attempt": attempt.number,
            "expires_at": file_locks.iso(attempt.expires_at)}
    locks: list[FileLock] = []
    if step.files:
        # The declared files come with the lease, in the same transaction (the project lock is held).
        locks = file_locks.grant_declared_files(step=step, agent=agent, expires_at=attempt.expires_at)
        data.update(file_locks.lock_event_data(locks))
    with connection.cursor() as cursor:
        cursor.execute(GRANT_SQL, {
            "attempt": attempt.id, "step": step.id, "agent": agent.id, "number": attempt.number,
            "hash": attempt.lease_token_hash, "key": idempotency_key, "now": now, "expires": attempt.expires_at,
            "workflow": step.workflow_id, "data": json.dumps(data),
        })
        granted = rows.fetch_named(cursor)
    attempt._state.adding = False
    return _leased(step=step, attempt=attempt, agent=agent, token=token, now=now, started_at=granted["started_at"],
                   dep_results=dep_results, locks=locks,
                   event=Event(id=granted["event_id"], workflow_id=step.workflow_id, seq=granted["seq"],
                               kind="step.leased", step_id=step.id, agent_id=agent.id, data=data, at=now))


def _leased(*, step: Step, attempt: Attempt, agent: Agent, token: str, now: datetime, started_at: datetime,
            dep_results: list, event: Event, locks: list[FileLock] = ()) -> Lease:
    """The lease of a step just granted (its rows written): the step as the grant left it, its event published."""
    step.status = StepStatus.IN_PROGRESS
    step.attempt = attempt.number
    step.lease_agent = agent
    step.lease_token_hash = attempt.lease_token_hash
    step.lease_expires_at = attempt.expires_at
    step.lease_attempt = attempt
    step.started_at = started_at
    step.updated_at = now
    inserted_event_published(event)
    inputs = {key: {"final_result": final_result, "outputs": outputs} for key, final_result, outputs in dep_results}
    inputs.update(step.extra_inputs or {})
    return Lease(step=step, attempt=attempt, token=token, inputs=inputs, locks=sorted(locks, key=lambda l: l.path))


def pull_waiting(*, agent: Agent, roles: list[str], wait: float, idempotency_key: str = "",
                 release_connection: Callable[[], None] | None = None) -> Lease | None:
    """Pull, waiting up to `wait` seconds for a step to become ready (holding no database connection meanwhile)."""
    leases = batch_pull_waiting(agent=agent, roles=roles, count=1, wait=wait, idempotency_key=idempotency_key,
                                release_connection=release_connection)
    return leases[0] if leases else None


def batch_pull_waiting(*, agent: Agent, roles: list[str], count: int, wait: float, idempotency_key: str = "",
                       release_connection: Callable[[], None] | None = None) -> list[Lease]:
    """Lease up to `count` steps, waiting up to `wait` seconds for the first to become ready.

    The long-poll of the REST pull and of the MCP `pull_step` tool. It wakes when
    a step of these roles becomes ready (NOTIFY), when a backed-off step's time
    comes, or when a lock is released in a project whose steps it passed over.
    """
    deadline = time.monotonic() + wait
    waiter = notify.listener.register(notify.STEP_READY, roles) if wait > 0 else None
    try:
        while True:
            result = steps_pull(agent=agent, roles=roles, count=count, idempotency_key=idempotency_key)
            if waiter is not None and isinstance(result, list):
                _pass_on_unused_wakes(waiter, result)
            if isinstance(result, list):
                return result
            if waiter is not None:
                waiter.take_wakes()  # nothing was ready: there is no step to hand the wake on for
            remaining = deadline - time.monotonic()
            if waiter is None or remaining <= 0:
                return []
            timeout = remaining
            waiter.also(notify.LOCKS, result.blocked_projects)
            if result.next_available_at is not None:
                timeout = min(timeout, max(0.01, (result.next_available_at - timezone.now()).total_seconds()))
            (release_connection or release_idle_connection)()
            waiter.wait(timeout)
    finally:
        if waiter is not None:
            notify.listener.unregister(waiter)


def _pass_on_unused_wakes(waiter: notify.Waiter, leases: list[Lease]) -> None:
    """A pull woken for a role that took no step of it (it took one of its other roles): wake another
    waiter of that role in its place, so the step released for it is not left waiting for a timeout."""
    taken = Counter(lease.step.role for lease in leases)
    unused = []
    for role in waiter.take_wakes():
        if taken[role] > 0:
            taken[role] -= 1
        else:
            unused.append(role)
    if unused:
        notify.listener.pass_on(waiter, unused)


def release_idle_connection() -> None:
    """Hold no database connection while a request waits (unless a caller's transaction is open)."""
    if not connection.in_atomic_block:
        connection.close()


def steps_pullable(*, agent: Agent, roles: list[str], limit: int = MAX_LISTED) -> list[Step]:
    """The steps a pull by `agent` could be handed now, in the order a pull takes them (MCP `list_ready`).

    Only roles the agent holds (403 otherwise); steps waiting out a backoff, of
    paused workflows, or approval steps are not listed. Locks are not checked:
    a listed step whose files are locked may still be passed over.
    """
    agent_registry.check_roles(agent, roles)
    return list(
        Step.objects.filter(status=StepStatus.READY, role__in=roles, available_at__lte=timezone.now(),
                            workflow__status="running")
        .exclude(role=agent_registry.HUMAN_ROLE)
        .select_related("workflow")
        .order_by("-workflow_priority", "-priority", "available_at")[:limit]
    )
