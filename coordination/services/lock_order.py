"""The one order in which services lock rows, the helpers that take those locks, and the retry safety net.

Every transaction that waits for more than one lock takes them in this order:

1. the agent row (a pull: its capacity check and its grant are one decision;
   taken by bumping its `pull_seq`);
2. steps, by ascending id, all a transaction will change taken in one statement
   (`ORDER BY id FOR UPDATE`): a report locks its step with the dependents it may
   release or skip, a cancel every live step of the workflow, a retry or a
   rework the steps it reopens;
3. the project's advisory lock (transaction-scoped): lock grants take it
   exclusively, workspace writes shared, so a grant waits for the writes made
   under the locks it decides about;
4. file lock rows (a workspace write locks the ones it writes under, a lock's
   holder and staff release single rows, a report releases its step's; the
   sweep takes expired ones by id, skipping those in use);
5. the project row (its workspace version);
6. workflow rows, by ascending id, `FOR NO KEY UPDATE` (the status, and the
   counters when a change moves them on the row, always by a statement of its
   own before the one that moves them: `workflow_counters.LOCK_WORKFLOW_SQL`),
   then their `WorkflowDelta` rows, which only the statement that folds them into
   their workflow row locks (to delete them);
7. the reporting agent's usage row (`AgentUsage`: its kept totals), by the
   statement that stores a result, after everything else it changes.

The hot paths' statements (a pull, a completed report, a lock's grant or release)
never lock a workflow row: their events are numbered by the database without a counter
(`event_log`), and their counter moves are inserted as `WorkflowDelta` rows
(`workflow_counters`); an insert's foreign key check takes only a KEY SHARE lock
on the workflow row, which `NO KEY UPDATE` leaves free. So many agents on one
workflow never queue behind each other on its row. A completion that may finish
its workflow settles it after its commit, in a transaction of its own (a
completion holds the usage row, rule 7, by then).

Nothing here is ever locked in the other direction, so two services can never
wait on each other. Locks that never wait do not count: a pull claims its step
with `SKIP LOCKED` after the agent and may pass over a step whose files are
locked, and a second project in the same pull is only *tried*
(`pg_try_advisory_xact_lock`), never waited for.

The common pull, heartbeat and lock release are each one statement run on its
own (no transaction round trips); the common report and lock grant are a
statement that takes their first locks and the statement that decides, sent
together in one transaction (`run_after_lock`), so that the decision reads
everything committed before those locks. Within a statement the locks are taken
in the same order: a locking CTE is read whole (`count(*)`), since a CTE runs
only as far as its reader reads. A statement that waits for a row it then
updates checks the new row against the table's constraints as computed from the
version its snapshot saw, before it waits: a relative update that a stale
version would take below a constraint (the workflow counters) runs after a
statement that took the lock. The one-statement pull reads in a snapshot taken
before it waited for the agent's row, so it compares the `pull_seq` it bumped
under that lock with the value its snapshot saw; when another pull of the agent
committed in between it changes nothing, and the decision is taken again in a
transaction that reads after the lock.

What PostgreSQL still refuses (a deadlock, a serialization failure, a lock wait
timeout) is retried by `retrying` in a new transaction, a bounded number of
times; after that the caller gets `Busy` (503 `busy`: retry later), which never
claims PostgreSQL is down.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from datetime import datetime
from enum import Enum
from typing import Any, Callable, TypeVar
from uuid import UUID

from django.db import OperationalError, connection, transaction
from psycopg import pq

from coordination import rows
from coordination.errors import Busy, NotFound
from coordination.models import Attempt, FileLock, Project, Step, Workflow

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs of a transaction PostgreSQL rolled back because of other transactions: safe to run again.
RETRYABLE_SQLSTATES = {
    "40P01": "a deadlock with another transaction",
    "40001": "a serialization failure",
    "55P03": "a lock that was not free in time",
}
MAX_TRIES = 4


class RetryTransaction(Exception):
    """Raised inside a service when what it locked changed under it: run the whole transaction again."""


def conflict_reason(exc: BaseException) -> str | None:
    """Why PostgreSQL refused a transaction that may succeed if run again, or None."""
    cause = exc.__cause__ if isinstance(exc, OperationalError) else exc
    return RETRYABLE_SQLSTATES.get(getattr(cause, "sqlstate", None) or "")


def unless_conflict(run: Callable[[], T]) -> T | None:
    """`run()`, the one statement of a hot path's common case; None when PostgreSQL refused it for a conflict
    (rolled back whole: nothing was written), for the caller to take its transaction path, which retries. In a
    caller's transaction the refusal is raised: that transaction is the unit that failed."""
    try:
        return run()
    except OperationalError as exc:
        if connection.in_atomic_block or conflict_reason(exc) is None:
            raise
        return None


def retrying(function: Callable[..., T]) -> Callable[..., T]:
    """Run a service in a transaction of its own; run it again when PostgreSQL rolled it back for a conflict.

    Inside a caller's transaction it joins that transaction (as `transaction.atomic`
    does) and cannot retry: the caller's transaction is the unit that failed.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if connection.in_atomic_block:
            with transaction.atomic():
                return function(*args, **kwargs)
        for attempt in range(1, MAX_TRIES + 1):
            try:
                with transaction.atomic():
                    return function(*args, **kwargs)
            except (OperationalError, RetryTransaction) as exc:
                reason = "a change under its locks" if isinstance(exc, RetryTransaction) else conflict_reason(exc)
                if reason is None:
                    raise
                if attempt == MAX_TRIES:
                    logger.warning("%s gave up after %d tries: %s.", function.__name__, attempt, reason)
                    raise Busy(
                        f"The server was busy ({reason}, {attempt} times); nothing was changed. "
                        "Send the request again.",
                        retryable=True,
                    ) from exc
                logger.info("%s ran into %s; trying again (%d/%d).", function.__name__, reason, attempt, MAX_TRIES)
                time.sleep(random.uniform(0.005, 0.02) * attempt)
        raise AssertionError("unreachable")

    return wrapper


# --- 1. agents -------------------------------------------------------------------

# Plain SQL: the first statement of a pull in a transaction; nothing to read back. It bumps `pull_seq`, as a
# pull in one statement does, so that such a pull learns that this one committed leases it did not count.
LOCK_AGENT_SQL = "UPDATE coordination_agent SET pull_seq = pull_seq + 1 WHERE id = %(agent)s"


def lock_agent(agent_id: UUID) -> None:
    with connection.cursor() as cursor:
        cursor.execute(LOCK_AGENT_SQL, {"agent": agent_id})


# --- 2. steps ----------------------------------------------------------------------


class Along(Enum):
    """Which other steps a service locks with the one it works on (all in one statement, by id)."""

    NONE = "none"
    DEPENDENTS = "dependents"  # its direct dependents: a completion releases them
    DOWNSTREAM = "downstream"  # everything downstream: a failure skips it, a retry reopens it


# Which rows `targets` locks: the step, and those along it, as one list of ids, so the step table is read
# through its primary key (`t.id = X OR t.id IN (...)` cannot use it: it read every step, history included).
_ALONG_SQL = {
    Along.NONE: "t.id = %(step)s",
    Along.DEPENDENTS: ("t.id IN (SELECT %(step)s::uuid UNION ALL "
                       "SELECT e.step_id FROM coordination_stepdependency e WHERE e.depends_on_id = %(step)s)"),
    Along.DOWNSTREAM: "t.id IN (SELECT %(step)s::uuid UNION ALL SELECT id FROM down)",
}

_DOWNSTREAM_CTE = """down(id) AS (
    SELECT e.step_id FROM coordination_stepdependency e WHERE e.depends_on_id = %(step)s
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
), """

# Plain SQL, because the ORM cannot say it in one round trip: on every heartbeat and report.
# `targets` locks the step and the steps it may change, in id order; the outer query locks the step
# again (already ours, so at once) to read its newest version, with its workflow, its current
# attempt and, for a report, the answer already given to the same lease (`replay`).
# `targets` is read whole (`count(*)`): a CTE runs only as far as its reader reads, so `EXISTS` would lock
# the first row alone and leave the others to later statements, in no set order (a test pins this).
_LOCKED_STEP_SQL = """
WITH {recursive}{downstream}targets AS MATERIALIZED (
    SELECT t.id FROM coordination_step t WHERE {along}
    ORDER BY t.id
    FOR UPDATE
)
SELECT {step_columns}, {workflow_columns}, {attempt_columns}, {replay} AS replay
FROM coordination_step s
JOIN coordination_workflow w ON w.id = s.workflow_id
LEFT JOIN coordination_attempt a ON a.id = s.lease_attempt_id
WHERE s.id = %(step)s AND (SELECT count(*) FROM targets) > 0
FOR UPDATE OF s
"""
_REPLAY_SQL = """(
    SELECT r.response FROM coordination_result r JOIN coordination_attempt ra ON ra.id = r.attempt_id
    WHERE r.step_id = s.id AND ra.lease_token_hash = %(hash)s AND ra.agent_id = %(agent)s)"""


def _locked_step_sql(along: Along, replay: bool) -> str:
    return _LOCKED_STEP_SQL.format(
        recursive="RECURSIVE " if along is Along.DOWNSTREAM else "",
        downstream=_DOWNSTREAM_CTE if along is Along.DOWNSTREAM else "",
        along=_ALONG_SQL[along],
        step_columns=rows.select_list(Step, "s"),
        workflow_columns=rows.select_list(Workflow, "w"),
        attempt_columns=rows.select_list(Attempt, "a"),
        replay=_REPLAY_SQL if replay else "NULL",
    )


LOCKED_STEP_SQL = {(along, replay): _locked_step_sql(along, replay) for along in Along for replay in (False, True)}


def locked_step(step_id: UUID, *, along: Along = Along.NONE, replay_for: tuple[str, UUID] | None = None) -> Step:
    """The step, locked with the steps `along` it, with its workflow and current attempt (`lease_attempt`).

    `replay_for=(lease token hash, agent id)`: also read the answer already given
    to a report of that lease, as `step.replay` (None if there was none).
    """
    params: dict[str, Any] = {"step": step_id}
    if replay_for is not None:
        params["hash"], params["agent"] = replay_for
    with connection.cursor() as cursor:
        cursor.execute(LOCKED_STEP_SQL[(along, replay_for is not None)], params)
        row = rows.fetch_named(cursor)
    if row is None:
        raise NotFound(f"Step {step_id} does not exist.")
    step = rows.from_named(Step, row, "s")
    step.workflow = rows.from_named(Workflow, row, "w")
    step.lease_attempt = rows.from_named(Attempt, row, "a")
    replay = row["replay"]
    step.replay = rows.json_value(replay)
    return step


# Plain SQL: the step and its direct dependents locked in id order, read whole (see `_LOCKED_STEP_SQL`); run
# before a statement that must read them as they are once locked (`run_after_lock`).
LOCK_STEP_AND_DEPENDENTS_SQL = f"""
SELECT count(*) AS locked FROM (
    SELECT t.id FROM coordination_step t WHERE {_ALONG_SQL[Along.DEPENDENTS]} ORDER BY t.id FOR UPDATE
) AS targets
"""


def run_after_lock(lock_sql: str, lock_params: dict[str, Any], sql: str, params: dict[str, Any]) -> list[dict]:
    """Run `lock_sql`, then `sql`, in one transaction, sent to PostgreSQL together (psycopg's pipeline mode):
    one round trip, and `sql` reads in a snapshot taken once the locks of `lock_sql` are held, so it sees
    everything committed before them. The locks are held only while PostgreSQL runs the two, never while
    this process waits for its turn to run Python. Returns the rows of `sql`.

    In a caller's transaction the two are sent together in it.
    """
    connection.ensure_connection()
    raw = connection.connection
    if connection.in_atomic_block:
        with connection.cursor() as locked, connection.cursor() as decided:
            with connection.wrap_database_errors, raw.pipeline():
                locked.execute(lock_sql, lock_params)
                decided.execute(sql, params)
            return rows.fetch_all_named(decided)
    with connection.cursor() as locked, connection.cursor() as decided:
        try:
            # BEGIN and COMMIT are queued with the statements: psycopg's own transaction block would wait for
            # the statements' results before sending COMMIT, a round trip with the locks held.
            with connection.wrap_database_errors, raw.pipeline():
                raw.execute("BEGIN")
                locked.execute(lock_sql, lock_params)
                decided.execute(sql, params)
                raw.execute("COMMIT")
        except BaseException:
            if raw.info.transaction_status != pq.TransactionStatus.IDLE:
                try:
                    raw.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - the connection is broken: Django replaces it
                    logger.warning("Could not roll back after a failed statement pair.", exc_info=True)
            raise
        return rows.fetch_all_named(decided)


# Plain SQL: `FOR UPDATE` in id order with the statuses as they are once locked (one round trip).
LOCK_LIVE_STEPS_SQL = """
SELECT id, status FROM coordination_step
WHERE workflow_id = %(workflow)s AND status IN ('pending', 'ready', 'in_progress')
ORDER BY id
FOR UPDATE
"""


def lock_live_steps(workflow_id: UUID) -> list[dict[str, Any]]:
    """Every step of a workflow that is not finished, locked: [{"id", "status"}] (a cancel)."""
    with connection.cursor() as cursor:
        cursor.execute(LOCK_LIVE_STEPS_SQL, {"workflow": workflow_id})
        return rows.fetch_all_named(cursor)


# Plain SQL: `FOR UPDATE` in id order, nothing read back.
LOCK_ALL_STEPS_SQL = "SELECT id FROM coordination_step WHERE workflow_id = %(workflow)s ORDER BY id FOR UPDATE"


def lock_all_steps(workflow_id: UUID) -> None:
    """Every step of a workflow, locked (an edit of the workflow's priority, a deletion)."""
    with connection.cursor() as cursor:
        cursor.execute(LOCK_ALL_STEPS_SQL, {"workflow": workflow_id})


# Plain SQL: a recursive walk down the graph, then the rows locked in id order, in one round trip.
LOCK_STEPS_AND_DOWNSTREAM_SQL = """
WITH RECURSIVE down(id) AS (
    SELECT id FROM coordination_step WHERE workflow_id = %(workflow)s AND key = ANY(%(keys)s::text[])
    UNION
    SELECT e.step_id FROM coordination_stepdependency e JOIN down d ON e.depends_on_id = d.id
)
SELECT s.id FROM coordination_step s WHERE s.id IN (SELECT id FROM down)
ORDER BY s.id
FOR UPDATE
"""


def lock_steps_and_downstream(workflow_id: UUID, keys: list[str]) -> list[Step]:
    """The steps named by key and everything downstream of them, locked (a rework)."""
    with connection.cursor() as cursor:
        cursor.execute(LOCK_STEPS_AND_DOWNSTREAM_SQL, {"workflow": workflow_id, "keys": keys})
        ids = [row["id"] for row in rows.fetch_all_named(cursor)]
    return list(Step.objects.filter(id__in=ids).order_by("id"))


def lock_step_for_edit(step_id: UUID) -> Step:
    """One step, locked on its own (an edit of its descriptive fields changes no other row but the event's)."""
    step = Step.objects.select_for_update(of=("self",)).select_related("workflow").filter(id=step_id).first()
    if step is None:
        raise NotFound(f"Step {step_id} does not exist.")
    return step


# --- 3. projects -------------------------------------------------------------------


def advisory_key(project_id: UUID) -> int:
    """The project's advisory lock key: the id's first 64 bits as a signed bigint."""
    value = project_id.int >> 64
    return value - (1 << 64) if value >= (1 << 63) else value


# Plain SQL: advisory locks have no ORM form; the database clock is read after the lock is held.
LOCK_PROJECT_SQL = "SELECT pg_advisory_xact_lock(%(key)s) AS locked, clock_timestamp() AS now"
TRY_LOCK_PROJECT_SQL = "SELECT pg_try_advisory_xact_lock(%(key)s) AS locked, clock_timestamp() AS now"


# Plain SQL: a project found by name and its advisory lock taken in one round trip (the key is `advisory_key`
# in SQL: the id's first 64 bits as a signed bigint); the clock is read after the lock, left to right.
LOCK_PROJECT_BY_NAME_SQL = f"""
SELECT {rows.select_list(Project, "p")},
       pg_advisory_xact_lock(('x' || substr(replace(p.id::text, '-', ''), 1, 16))::bit(64)::bigint) AS locked,
       clock_timestamp() AS now
FROM coordination_project p WHERE p.name = %(name)s
"""


def lock_project_named(name: str) -> tuple[Project, datetime] | None:
    """The project called `name` with its lock held (as `lock_project`) and the clock after it; None if none."""
    with connection.cursor() as cursor:
        cursor.execute(LOCK_PROJECT_BY_NAME_SQL, {"name": name})
        row = rows.fetch_named(cursor)
    if row is None:
        return None
    return rows.from_named(Project, row, "p"), row["now"]


def lock_project(project_id: UUID):
    """Serialise lock decisions in a project; return the database clock read after the lock."""
    with connection.cursor() as cursor:
        cursor.execute(LOCK_PROJECT_SQL, {"key": advisory_key(project_id)})
        return rows.fetch_named(cursor)["now"]


# Plain SQL: advisory locks have no ORM form.
SHARE_PROJECT_SQL = "SELECT pg_advisory_xact_lock_shared(%(key)s) AS locked"


def share_project(project_id: UUID) -> None:
    """Hold the project's lock shared (a workspace write): grants in the project wait until this commits."""
    with connection.cursor() as cursor:
        cursor.execute(SHARE_PROJECT_SQL, {"key": advisory_key(project_id)})


def try_lock_project(project_id: UUID):
    """As `lock_project` without waiting: the clock if the lock was free (or ours already), else None."""
    with connection.cursor() as cursor:
        cursor.execute(TRY_LOCK_PROJECT_SQL, {"key": advisory_key(project_id)})
        row = rows.fetch_named(cursor)
    return row["now"] if row["locked"] else None


# --- 4. file locks -----------------------------------------------------------------


def lock_file_lock(lock_id: UUID) -> FileLock:
    lock = (
        FileLock.objects.select_for_update(of=("self",))
        .select_related("agent", "project", "step")
        .filter(id=lock_id)
        .first()
    )
    if lock is None:
        raise NotFound(f"Lock {lock_id} does not exist.")
    return lock


# --- 5. workflows ------------------------------------------------------------------


def lock_workflow(workflow_id: UUID, *, deleting: bool = False) -> Workflow:
    """The workflow, its row locked `FOR NO KEY UPDATE`: that excludes every other change of the row, but not the
    inserts that only reference it (events, deltas: their foreign key checks), which would otherwise queue
    behind it. `deleting`: `FOR UPDATE`, which holds those inserts back until the row is gone."""
    workflow = (Workflow.objects.select_for_update(of=("self",), no_key=not deleting).select_related("project")
                .filter(id=workflow_id).first())
    if workflow is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return workflow
