"""File locks: path -> holder, shared (`read`) or exclusive (`write`), with expiry and fencing numbers.

A lock is granted under the project's transaction-scoped advisory lock (see
`lock_order`), so two requests for overlapping paths (`src/` and `src/app.py`)
are decided one after the other. Timestamps of grants and releases come from the
database clock read after that lock, so the stored history orders grants exactly
as they happened. A holder is (agent, step): an agent's two concurrent steps do
not share locks. Locks under a step lease follow the lease: heartbeats renew
them and the step's end releases them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, Callable
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from coordination import notify, rows
from coordination.errors import Conflict, Forbidden, InvalidRequest, LockConflict, NotFound, StaleLease
from coordination.events import inserted_event_published
from coordination.models import Agent, Event, FileLock, LockMode, LockWaiter, Project, Step
from coordination.paths import normalise_path, paths_overlap
from coordination.services import event_log, leases, lock_order
from coordination.services.projects import project_get_or_create
from coordination.services.workflow_counters import actor

MAX_PATHS_PER_REQUEST = 200
LOCK_TTL_DEFAULT_S = 300
LOCK_TTL_MAX_S = 3600
LOCK_WAIT_MAX_S = 30
SWEEP_BATCH = 1000

# Plain SQL: the ORM has no way to read the database's clock.
DB_NOW_SQL = "SELECT clock_timestamp() AS now"

# Plain SQL: an indexed overlap search (exact paths and LIKE prefixes) joined with the holder's name.
# Plain SQL, one round trip for a lock decision's two questions: the live locks near the paths (held), and
# the requests queued ahead in the project (queued: earlier waiters, oldest first). It also answers the clock
# read after its snapshot was taken (`checked_at`, on every row, one row when nothing is near): a grant made on
# this answer is dated then, so a release it saw committed is always dated before it.
LIVE_LOCKS_NEAR_SQL = """
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now)
SELECT clock.now AS checked_at, near.*
FROM clock LEFT JOIN LATERAL (
    SELECT false AS queued, ARRAY[l.path] AS paths, l.mode, l.agent_id, a.name AS agent_name, l.step_id,
           l.expires_at, l.path AS sort_path, l.acquired_at AS sort_at, 0::bigint AS sort_id
    FROM coordination_filelock l LEFT JOIN coordination_agent a ON a.id = l.agent_id
    WHERE l.project_id = %(project)s AND l.released_at IS NULL AND l.expires_at > clock.now
      AND (l.path = ANY(%(exact)s::text[]) OR l.path LIKE ANY(%(prefixes)s::text[]))
    UNION ALL
    SELECT true, w.paths, w.mode, w.agent_id, a.name, w.step_id, w.expires_at, '', w.created_at, w.id
    FROM coordination_lockwaiter w LEFT JOIN coordination_agent a ON a.id = w.agent_id
    WHERE w.project_id = %(project)s AND w.expires_at > clock.now
      AND (%(waiter)s::bigint IS NULL OR w.id < %(waiter)s)
) AS near ON true
ORDER BY near.queued, near.sort_path, near.sort_id, near.sort_at
"""

# Plain SQL, one round trip for a grant: bump every path's fencing counter (creating it at 1) in one upsert
# and insert the locks with those numbers.
GRANT_SQL = """
WITH fence AS (
    INSERT INTO coordination_lockfence (project_id, path, last)
    SELECT %(project)s, p, 1 FROM unnest(%(paths)s::text[]) AS p
    ON CONFLICT (project_id, path) DO UPDATE SET last = coordination_lockfence.last + 1
    RETURNING path, last
)
INSERT INTO coordination_filelock (id, project_id, path, mode, agent_id, step_id, fencing, acquired_at, expires_at,
                                   released_at, release_reason)
SELECT g.id, %(project)s, g.path, %(mode)s, %(agent)s, %(step)s, fence.last, %(now)s, %(expires)s, NULL, ''
FROM unnest(%(ids)s::uuid[], %(paths)s::text[]) AS g(id, path) JOIN fence ON fence.path = g.path
RETURNING path, fencing
"""

# Plain SQL: release one lock (its row locked by the caller) and wake the project's lock waiters.
RELEASE_ONE_SQL = """
WITH released AS (
    UPDATE coordination_filelock SET released_at = LEAST(clock_timestamp(), expires_at), release_reason = %(reason)s
    WHERE id = %(lock)s
    RETURNING project_id, released_at
)
SELECT released_at, pg_notify('{channel}', project_id::text) AS notified FROM released
"""

# Plain SQL, the decision on an agent's request for locks of its own (no step lease) and, when nothing stands in
# its way, the grant, in one statement. It runs right after the project's lock was taken by the statement before
# it (`lock_order.LOCK_PROJECT_SQL`), in the same transaction, both sent at once (`_locks_acquire_at_once`),
# so its snapshot sees every grant and release committed before the lock. In order: the clock, read after the
# lock (what counts as expired, and the grant's date); whether a live lock of another holder conflicts (every row
# the indexed search of `LIVE_LOCKS_NEAR_SQL` finds overlaps a requested path: `_overlap_candidates`) or a request
# is queued in the project; if neither, the grant (fencing and rows, as `GRANT_SQL`) and its `locks.granted` event.
# `granted` false when anything stood in the way (nothing written): the transaction path then names the blockers.
ACQUIRE_AT_ONCE_SQL = f"""
WITH project AS MATERIALIZED (
    SELECT p.id, p.name, clock_timestamp() AS now FROM coordination_project p WHERE p.id = %(project)s
), ok AS MATERIALIZED (
    SELECT project.id, project.name, project.now FROM project
    WHERE NOT EXISTS (
          SELECT 1 FROM coordination_filelock l
          WHERE l.project_id = project.id AND l.released_at IS NULL AND l.expires_at > project.now
            AND (l.path = ANY(%(exact)s::text[]) OR l.path LIKE ANY(%(prefixes)s::text[]))
            AND (%(mode)s = 'write' OR l.mode = 'write')
            AND NOT (l.agent_id IS NOT DISTINCT FROM %(agent)s::uuid AND l.step_id IS NULL))
      AND NOT EXISTS (
          SELECT 1 FROM coordination_lockwaiter w WHERE w.project_id = project.id AND w.expires_at > project.now)
), fence AS (
    INSERT INTO coordination_lockfence (project_id, path, last)
    SELECT ok.id, p, 1 FROM ok, unnest(%(paths)s::text[]) AS p
    ON CONFLICT (project_id, path) DO UPDATE SET last = coordination_lockfence.last + 1
    RETURNING path, last
), granted AS (
    INSERT INTO coordination_filelock (id, project_id, path, mode, agent_id, step_id, fencing, acquired_at,
                                       expires_at, released_at, release_reason)
    SELECT g.id, ok.id, g.path, %(mode)s, %(agent)s, NULL, fence.last, ok.now,
           ok.now + make_interval(secs => %(ttl)s), NULL, ''
    FROM ok, unnest(%(ids)s::uuid[], %(paths)s::text[]) AS g(id, path) JOIN fence ON fence.path = g.path
    RETURNING {rows.select_list(FileLock, "coordination_filelock", "l")}
), event AS (
    INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
    SELECT NULL, 'locks.granted', NULL, %(agent)s,
           jsonb_build_object('project', ok.name, 'agent', %(agent_name)s::text,
                              'locks', (SELECT jsonb_agg(jsonb_build_object('path', l__path, 'mode', l__mode,
                                                                            'fencing', l__fencing) ORDER BY l__path)
                                        FROM granted)),
           %(now)s
    FROM ok
    RETURNING id AS event_id, seq AS event_seq, data AS event_data
)
SELECT project.id AS project_id, ok.id IS NOT NULL AS granted, event.*, granted.*
FROM project LEFT JOIN ok ON true LEFT JOIN event ON true LEFT JOIN granted ON true
ORDER BY granted.l__path
"""

# Plain SQL, a holder's release of a live lock in one statement run on its own: the release, the
# `locks.released` event (in its step's workflow's log, for a lock under a step), and the NOTIFY that wakes the
# project's lock waiters. No row when the lock is not
# the caller's live lock: nothing was written, and `lock_release` answers in a transaction (404, 403, or
# "released already").
RELEASE_BY_HOLDER_SQL = f"""
WITH released AS (
    UPDATE coordination_filelock l
    SET released_at = LEAST(clock_timestamp(), l.expires_at), release_reason = %(reason)s
    WHERE l.id = %(lock)s AND l.agent_id = %(agent)s AND l.released_at IS NULL
    RETURNING {rows.select_list(FileLock, "l")}
), event AS (
    INSERT INTO coordination_event (workflow_id, kind, step_id, agent_id, data, at)
    SELECT s.workflow_id, 'locks.released', r.l__step_id, %(agent)s,
           jsonb_build_object('project', p.name, 'reason', %(reason)s::text, 'by_agent', %(agent_name)s::text,
                              'locks', jsonb_build_array(jsonb_build_object('path', r.l__path, 'mode', r.l__mode,
                                                                            'fencing', r.l__fencing))),
           %(now)s
    FROM released r JOIN coordination_project p ON p.id = r.l__project_id
    LEFT JOIN coordination_step s ON s.id = r.l__step_id
    RETURNING id AS event_id, workflow_id AS event_workflow_id, seq AS event_seq, data AS event_data
)
SELECT released.*, event.*, pg_notify('{{channel}}', released.l__project_id::text) AS notified
FROM released, event
"""

# Plain SQL: release a set of steps' locks and learn their workflows in one UPDATE ... RETURNING.
RELEASE_FOR_STEPS_SQL = """
UPDATE coordination_filelock l
SET released_at = LEAST(clock_timestamp(), l.expires_at), release_reason = %(reason)s
FROM coordination_step s
WHERE l.step_id = ANY(%(steps)s::uuid[]) AND l.released_at IS NULL AND s.id = l.step_id
RETURNING l.project_id, s.workflow_id, l.step_id, l.agent_id, l.path, l.mode, l.fencing
"""

# Plain SQL: expired locks taken in id order, skipping any another transaction holds (a concurrent sweep,
# a staff release), marked released at their expiry, with their steps' workflows, in one round trip.
SWEEP_EXPIRED_SQL = """
WITH expired AS (
    SELECT id FROM coordination_filelock
    WHERE released_at IS NULL AND expires_at <= clock_timestamp()
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE coordination_filelock l
SET released_at = l.expires_at, release_reason = 'expired'
FROM expired
WHERE l.id = expired.id
RETURNING l.project_id, l.step_id, (SELECT st.workflow_id FROM coordination_step st WHERE st.id = l.step_id)
          AS workflow_id, l.agent_id, l.path, l.mode, l.fencing
"""


@dataclass
class LockBlocker:
    path: str
    mode: str
    held_by: str | None
    step_id: UUID | None
    expires_at: datetime
    queued: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "mode": self.mode,
            "held_by": self.held_by,
            "step_id": str(self.step_id) if self.step_id else None,
            "expires_at": iso(self.expires_at),
            **({"queued": True} if self.queued else {}),
        }


@dataclass
class LockAttempt:
    granted: list[FileLock] | None
    blockers: list[LockBlocker]
    project_id: UUID


def iso(moment: datetime) -> str:
    return moment.astimezone(dt_timezone.utc).isoformat().replace("+00:00", "Z")


def db_now() -> datetime:
    """The database's clock: grants and releases are ordered by one clock, whichever server decided them."""
    with connection.cursor() as cursor:
        cursor.execute(DB_NOW_SQL)
        return rows.fetch_named(cursor)["now"]


def normalise_paths(raw_paths: list[Any]) -> list[str]:
    if not isinstance(raw_paths, list) or not raw_paths:
        raise InvalidRequest("Give at least one path in `paths`.")
    if len(raw_paths) > MAX_PATHS_PER_REQUEST:
        raise InvalidRequest(f"At most {MAX_PATHS_PER_REQUEST} paths per request; split it up.")
    return sorted({normalise_path(raw) for raw in raw_paths})


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _overlap_candidates(paths: list[str]) -> tuple[list[str], list[str]]:
    """Paths a live lock may have to overlap `paths` (exact values and LIKE prefixes), for an indexed query."""
    exact = {"./"}
    prefixes: list[str] = []
    for path in paths:
        exact.add(path)
        if path == "./":
            prefixes.append("%")
            continue
        if path.endswith("/"):
            exact.add(path[:-1])
            prefixes.append(_like_escape(path) + "%")
        else:
            exact.add(path + "/")
        parts = path.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            exact.add("/".join(parts[:depth]) + "/")
    return sorted(exact), prefixes


def _modes_conflict(a: str, b: str) -> bool:
    return a == LockMode.WRITE or b == LockMode.WRITE


def lock_blockers(
    *, project_id: UUID, paths: list[str], mode: str, agent_id: UUID | None, step_id: UUID | None,
    waiter_id: int | None,
) -> list[LockBlocker]:
    """Live locks, and requests queued ahead, that stop `paths` being granted in `mode` to this holder."""
    return lock_check(project_id=project_id, paths=paths, mode=mode, agent_id=agent_id, step_id=step_id,
                      waiter_id=waiter_id)[0]


def lock_check(
    *, project_id: UUID, paths: list[str], mode: str, agent_id: UUID | None, step_id: UUID | None,
    waiter_id: int | None,
) -> tuple[list[LockBlocker], datetime]:
    """The blockers of `paths` in `mode` for this holder, and the database clock read after they were looked at.

    The caller holds the project's lock. A holder is (agent, step): an agent's
    locks never block each other, except across its different steps, which may
    run at the same time.
    """
    exact, prefixes = _overlap_candidates(paths)
    blockers: list[LockBlocker] = []
    with connection.cursor() as cursor:
        cursor.execute(LIVE_LOCKS_NEAR_SQL, {"project": project_id, "exact": exact, "prefixes": prefixes,
                                             "waiter": waiter_id})
        near = rows.fetch_all_named(cursor)
    for row in near:
        if row["queued"] is None:
            continue  # nothing near: the row only carries the clock
        if row["agent_id"] == agent_id and row["step_id"] == step_id:
            continue
        if not _modes_conflict(mode, row["mode"]):
            continue
        for path in row["paths"]:
            if any(paths_overlap(path, mine) for mine in paths):
                blockers.append(LockBlocker(path, row["mode"], row["agent_name"], row["step_id"], row["expires_at"],
                                            queued=row["queued"]))
                break
    return blockers, near[0]["checked_at"]


def grant_locks(
    *, project_id: UUID, paths: list[str], mode: str, agent: Agent | None, step: Step | None,
    expires_at: datetime, now: datetime,
) -> list[FileLock]:
    """Insert the grants with fencing numbers larger than any before them for their paths (project lock held)."""
    locks = [
        FileLock(project_id=project_id, path=path, mode=mode, agent=agent, step=step, acquired_at=now,
                 expires_at=expires_at)
        for path in paths
    ]
    with connection.cursor() as cursor:
        cursor.execute(GRANT_SQL, {
            "project": project_id, "paths": paths, "ids": [lock.id for lock in locks], "mode": mode,
            "agent": agent.id if agent else None, "step": step.id if step else None, "now": now,
            "expires": expires_at})
        fencing = {row["path"]: row["fencing"] for row in rows.fetch_all_named(cursor)}
    for lock in locks:
        lock.fencing = fencing[lock.path]
        lock._state.adding = False
    return locks


def lock_event_data(locks) -> dict[str, Any]:
    return {"locks": [{"path": lock.path, "mode": lock.mode, "fencing": lock.fencing} for lock in locks]}


def declared_files_by_mode(step: Step) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for file in step.files:
        groups.setdefault(file["mode"], []).append(file["path"])
    return {mode: sorted(paths) for mode, paths in groups.items()}


def grant_declared_files(*, step: Step, agent: Agent, expires_at: datetime) -> list[FileLock]:
    """Lock a step's declared files for its new lease (the pull holds the project's lock)."""
    now = db_now()
    locks: list[FileLock] = []
    for mode, paths in declared_files_by_mode(step).items():
        locks += grant_locks(project_id=step.workflow.project_id, paths=paths, mode=mode, agent=agent, step=step,
                             expires_at=expires_at, now=now)
    return locks


@lock_order.retrying
def _locks_try(
    *, agent: Agent, project_name: str | None, paths: list[str], mode: str, step_id: UUID | None,
    lease_token: str | None, ttl_s: int, waiter_id: int | None,
) -> LockAttempt:
    """One decision on a lock request: granted now, or the blockers (in its own transaction)."""
    step = None
    if step_id is not None:
        step = lock_order.locked_step(step_id)
        leases.held_attempt(step, agent, lease_token or "")
        if not leases.lease_live(step, timezone.now()):
            raise StaleLease(f"The lease on step {step.key!r} has ended; its locks cannot be taken.",
                             step_status=step.status)
        project = Project.objects.get(id=step.workflow.project_id)
        if project_name and project_name != project.name:
            raise InvalidRequest(
                f"Step {step.key!r} works in project {project.name!r}, not {project_name!r}; omit `project` or fix it."
            )
    else:
        name = project_name or "default"
        found = lock_order.lock_project_named(name)  # the usual case: the project and its lock, one round trip
        if found is None:
            project = project_get_or_create(name=name) if name == "default" else None
            if project is None:
                raise NotFound(f"Project {project_name!r} does not exist: check the name (workflows create projects).")
            found = project, lock_order.lock_project(project.id)
        project = found[0]
    if step is not None:
        lock_order.lock_project(project.id)
    # Dated by the check itself: a release it saw committed is dated before the grant.
    blockers, now = lock_check(project_id=project.id, paths=paths, mode=mode, agent_id=agent.id,
                               step_id=step.id if step else None, waiter_id=waiter_id)
    if blockers:
        return LockAttempt(granted=None, blockers=blockers, project_id=project.id)
    expires_at = step.lease_expires_at if step is not None else now + timedelta(seconds=ttl_s)
    locks = grant_locks(project_id=project.id, paths=paths, mode=mode, agent=agent, step=step,
                        expires_at=expires_at, now=now)
    for lock in locks:
        lock.project = project
    event_log.event_record(kind="locks.granted", workflow_id=step.workflow_id if step else None,
                           step_id=step.id if step else None, agent_id=agent.id,
                           data={"project": project.name, "agent": agent.name, **lock_event_data(locks)})
    return LockAttempt(granted=locks, blockers=[], project_id=project.id)


def locks_acquire(
    *, agent: Agent, paths: list[Any], mode: str, project_name: str | None = None, step_id: UUID | None = None,
    lease_token: str | None = None, ttl_s: int | None = None, wait_s: float = 0,
    release_connection: Callable[[], None] | None = None,
) -> list[FileLock]:
    """Grant all `paths` in `mode` to `agent`, or none (`LockConflict` naming the blockers).

    With `wait_s`, the request queues (a `LockWaiter` row) and waits for the
    blockers to go, holding no transaction: it re-checks when a lock of the
    project is released (NOTIFY) or the first blocker expires. Requests queued
    earlier for overlapping paths go first, so readers cannot starve a writer.
    Under a step lease (`step_id` + `lease_token`) the locks follow the lease:
    they expire with it, heartbeats renew them and the step's end releases them.
    """
    if mode not in LockMode.values:
        raise InvalidRequest(f"mode {mode!r} is not 'read' or 'write'.")
    if (step_id is None) != (lease_token is None):
        raise InvalidRequest("Give `step_id` and `lease_token` together (a lock under a step lease), or neither.")
    normalised = normalise_paths(paths)
    ttl = ttl_s or LOCK_TTL_DEFAULT_S
    if not 1 <= ttl <= LOCK_TTL_MAX_S:
        raise InvalidRequest(f"ttl_s={ttl} is out of range 1..{LOCK_TTL_MAX_S}.")
    if not 0 <= wait_s <= LOCK_WAIT_MAX_S:
        raise InvalidRequest(f"wait_s={wait_s} is out of range 0..{LOCK_WAIT_MAX_S}.")
    if step_id is None:
        granted = _locks_acquire_at_once(agent=agent, project_name=project_name or "default", paths=normalised,
                                         mode=mode, ttl_s=ttl)
        if granted is not None:
            return granted
    deadline = time.monotonic() + wait_s
    waiter_row: LockWaiter | None = None
    waiter = None
    try:
        while True:
            attempt = _locks_try(agent=agent, project_name=project_name, paths=normalised, mode=mode,
                                 step_id=step_id, lease_token=lease_token, ttl_s=ttl,
                                 waiter_id=waiter_row.id if waiter_row else None)
            if attempt.granted is not None:
                return attempt.granted
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                first = attempt.blockers[0]
                who = f"{first.held_by or 'another holder'}{' (queued ahead)' if first.queued else ''}"
                raise LockConflict(
                    f"{first.path} is held ({first.mode}) by {who} until {iso(first.expires_at)}: "
                    "pick another step, wait (wait_s), or retry later.",
                    conflicts=[blocker.as_dict() for blocker in attempt.blockers],
                )
            if waiter_row is None:
                waiter = notify.listener.register(notify.LOCKS, [attempt.project_id])
                now = db_now()
                waiter_row = LockWaiter.objects.create(
                    project_id=attempt.project_id, paths=normalised, mode=mode, agent=agent, step_id=step_id,
                    created_at=now, expires_at=now + timedelta(seconds=remaining + 1),
                )
                continue  # re-check at once as a queued request
            soonest = min(blocker.expires_at for blocker in attempt.blockers)
            timeout = min(remaining, max(0.01, (soonest - db_now()).total_seconds()))
            if release_connection is not None:
                release_connection()
            waiter.wait(timeout)
    finally:
        if waiter is not None:
            notify.listener.unregister(waiter)
        if waiter_row is not None:
            with transaction.atomic():
                LockWaiter.objects.filter(id=waiter_row.id).delete()
                # Requests queued behind this one may go now.
                notify.notify_locks([waiter_row.project_id])


# Project ids by name, for the lock taken before `ACQUIRE_AT_ONCE_SQL`: a name always names the same project
# (names never change; a project deleted and made again under its name is found missing, and looked up again).
_project_ids: dict[str, UUID] = {}


def _locks_acquire_at_once(*, agent: Agent, project_name: str, paths: list[str], mode: str,
                           ttl_s: int) -> list[FileLock] | None:
    """Locks of the agent's own granted in one round trip, or None when that could not grant them (a conflict,
    a queued request, no such project, or PostgreSQL refused it for a conflict): `locks_acquire` then decides
    in a transaction of its own, and says why.

    The project's lock and the decision with the grant (`ACQUIRE_AT_ONCE_SQL`) are sent together
    (`lock_order.run_after_lock`): the lock is held only while PostgreSQL runs them, never while this process
    waits for its turn to run Python, which is what serialised concurrent grants in a project.
    """
    project_id = _project_ids.get(project_name)
    if project_id is None:
        project_id = Project.objects.filter(name=project_name).values_list("id", flat=True).first()
        if project_id is None:
            return None  # the transaction path creates 'default', or says the project does not exist
        _project_ids[project_name] = project_id
    now = timezone.now()
    exact, prefixes = _overlap_candidates(paths)
    ids = [uuid.uuid4() for _ in paths]
    try:
        found = lock_order.run_after_lock(lock_order.LOCK_PROJECT_SQL, {"key": lock_order.advisory_key(project_id)},
                                          ACQUIRE_AT_ONCE_SQL, {
                                              "project": project_id, "exact": exact, "prefixes": prefixes,
                                              "mode": mode, "agent": agent.id, "agent_name": agent.name,
                                              "paths": paths, "ids": ids, "ttl": ttl_s, "now": now})
    except OperationalError as exc:
        if connection.in_atomic_block or lock_order.conflict_reason(exc) is None:
            raise
        return None
    if not found:
        _project_ids.pop(project_name, None)  # deleted since: the transaction path answers
        return None
    if not found[0]["granted"]:
        return None
    project = Project(id=found[0]["project_id"], name=project_name)
    locks = []
    for row in found:
        lock = rows.from_named(FileLock, row, "l")
        lock.project = project
        lock.agent = agent
        locks.append(lock)
    event = Event(id=found[0]["event_id"], seq=found[0]["event_seq"], kind="locks.granted", agent_id=agent.id,
                  data=rows.json_value(found[0]["event_data"]), at=now)
    inserted_event_published(event)
    return locks


def _may_manage_lock(lock: FileLock, *, agent: Agent | None, user: AbstractBaseUser | None) -> bool:
    if agent is not None:
        return lock.agent_id == agent.id
    return bool(user is not None and user.is_authenticated and user.is_staff)


def lock_release(*, lock_id: UUID, agent: Agent | None = None, user: AbstractBaseUser | None = None,
                 reason: str = "released") -> FileLock:
    """Release a lock: its holder, or staff (a force-release). Releasing a released lock changes nothing.

    A holder's release of its live lock is one statement (`RELEASE_BY_HOLDER_SQL`); the rest (staff, a lock
    released already, someone else's, none) is decided in a transaction.
    """
    if agent is not None:
        now = timezone.now()
        with connection.cursor() as cursor:
            cursor.execute(RELEASE_BY_HOLDER_SQL.format(channel=notify.LOCKS), {
                "lock": lock_id, "agent": agent.id, "agent_name": agent.name, "reason": reason[:32], "now": now})
            row = rows.fetch_named(cursor)
        if row is not None:
            lock = rows.from_named(FileLock, row, "l")
            event = Event(id=row["event_id"], workflow_id=row["event_workflow_id"], seq=row["event_seq"],
                          kind="locks.released", step_id=lock.step_id, agent_id=agent.id,
                          data=rows.json_value(row["event_data"]), at=now)
            inserted_event_published(event)
            return lock
    return _lock_release(lock_id=lock_id, agent=agent, user=user, reason=reason)


@lock_order.retrying
def _lock_release(*, lock_id: UUID, agent: Agent | None, user: AbstractBaseUser | None, reason: str) -> FileLock:
    lock = lock_order.lock_file_lock(lock_id)
    if not _may_manage_lock(lock, agent=agent, user=user):
        raise Forbidden("Only the lock's holder, or staff, may release it.")
    if lock.released_at is not None:
        return lock
    lock.release_reason = (reason if agent is not None else "forced")[:32]
    with connection.cursor() as cursor:
        cursor.execute(RELEASE_ONE_SQL.format(channel=notify.LOCKS), {"lock": lock.id, "reason": lock.release_reason})
        lock.released_at = rows.fetch_named(cursor)["released_at"]
    event_log.event_record(kind="locks.released", workflow_id=lock.step.workflow_id if lock.step else None,
                           step_id=lock.step_id, agent_id=lock.agent_id,
                           data={"project": lock.project.name, "reason": lock.release_reason, **actor(user, agent),
                                 **lock_event_data([lock])})
    return lock


@lock_order.retrying
def lock_renew(*, lock_id: UUID, ttl_s: int, agent: Agent | None = None,
               user: AbstractBaseUser | None = None) -> FileLock:
    """Extend a live lock by `ttl_s` from now; a lock already expired or released is lost (409)."""
    if not 1 <= ttl_s <= LOCK_TTL_MAX_S:
        raise InvalidRequest(f"ttl_s={ttl_s} is out of range 1..{LOCK_TTL_MAX_S}.")
    lock = lock_order.lock_file_lock(lock_id)
    if not _may_manage_lock(lock, agent=agent, user=user):
        raise Forbidden("Only the lock's holder, or staff, may renew it.")
    now = db_now()
    if lock.released_at is not None or lock.expires_at <= now:
        raise Conflict(
            f"The lock on {lock.path} has {'been released' if lock.released_at else 'expired'}; acquire it again.",
        )
    lock.expires_at = now + timedelta(seconds=ttl_s)
    lock.save(update_fields=["expires_at"])
    return lock


def lock_release_for_step(*, step: Step, reason: str) -> int:
    return lock_release_for_steps(step_ids=[step.id], reason=reason)


def lock_release_for_steps(*, step_ids: list[UUID], reason: str) -> int:
    """Release every live lock taken under these steps (their end, or their lease's); the caller holds the steps."""
    if not step_ids:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(RELEASE_FOR_STEPS_SQL, {"reason": reason[:32], "steps": step_ids})
        released = rows.fetch_all_named(cursor)
    if released:
        record_locks_released(released, reason=reason)
    return len(released)


def record_locks_released(released: list[dict[str, Any]], *, reason: str, kind: str = "locks.released") -> None:
    """Wake lock waiters and record one event per (workflow, step, agent) for released lock rows.

    Each row has `project_id`, `workflow_id`, `step_id`, `agent_id`, `path`, `mode`, `fencing`; the events are
    recorded workflow by workflow, in id order.
    """
    notify.notify_locks({row["project_id"] for row in released})
    grouped: dict[tuple, list] = {}
    for row in released:
        key = (row["workflow_id"], row["step_id"], row["agent_id"])
        grouped.setdefault(key, []).append({"path": row["path"], "mode": row["mode"], "fencing": row["fencing"]})
    for (workflow_id, step_id, agent_id), locks in sorted(grouped.items(), key=lambda item: str(item[0][0] or "")):
        data = {"locks": locks} if kind == "locks.expired" else {"reason": reason, "locks": locks}
        event_log.event_record(kind=kind, workflow_id=workflow_id, step_id=step_id, agent_id=agent_id, data=data)


def locks_sweep(*, limit: int = SWEEP_BATCH) -> int:
    """Mark expired locks released (they stopped blocking at `expires_at` already) and record it, in batches."""
    total = 0
    while True:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(SWEEP_EXPIRED_SQL, {"limit": limit})
                expired = rows.fetch_all_named(cursor)
            if expired:
                record_locks_released(expired, reason="expired", kind="locks.expired")
        total += len(expired)
        if len(expired) < limit:
            break
    with transaction.atomic():
        LockWaiter.objects.filter(expires_at__lt=timezone.now() - timedelta(minutes=1)).delete()
    return total
