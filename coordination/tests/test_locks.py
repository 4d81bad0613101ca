"""File locks: the conflict matrix, the API, expiry, waiting in order, and the coupling to step leases."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from coordination.services import file_locks, leases, pull, reports, workflow_control, workflow_creation
from coordination.errors import Forbidden, LockConflict
from coordination.models import Event, FileLock, LockWaiter, Step
from coordination.tests.conftest import make_agent
from coordination.tests.factories import step, workflow_spec

pytestmark = pytest.mark.django_db


def acquire(agent, paths, mode="write", **extra):
    return file_locks.locks_acquire(agent=agent.agent, paths=paths, mode=mode, **extra)


def conflicts(agent, paths, mode="write", **extra) -> bool:
    try:
        acquire(agent, paths, mode, **extra)
    except LockConflict:
        return True
    return False


class ConflictMatrixTests:
    @pytest.mark.parametrize(("held", "wanted", "blocked"), [
        ("read", "read", False),
        ("read", "write", True),
        ("write", "read", True),
        ("write", "write", True),
    ])
    def test_modes(self, developer, other_developer, held, wanted, blocked):
        acquire(developer, ["src/app.py"], held)
        assert conflicts(other_developer, ["src/app.py"], wanted) is blocked

    @pytest.mark.parametrize(("held", "wanted"), [("src/", "src/app.py"), ("src/app.py", "src/"),
                                                  ("src/", "src/deep/x.py"), ("./", "README.md")])
    def test_a_directory_and_what_is_under_it_conflict_both_ways(self, developer, other_developer, held, wanted):
        acquire(developer, [held])
        assert conflicts(other_developer, [wanted])

    def test_disjoint_paths_do_not_conflict(self, developer, other_developer):
        acquire(developer, ["src/a.py", "docs/"])
        assert not conflicts(other_developer, ["src/b.py", "docsx/"])

    def test_the_same_agent_twice_does_not_block_itself(self, developer):
        first = acquire(developer, ["src/app.py"])
        second = acquire(developer, ["src/app.py"])
        assert second[0].fencing > first[0].fencing

    def test_the_same_agent_under_two_steps_is_blocked(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        leases = [pull.step_pull(agent=developer.agent, roles=["developer"]) for _ in range(2)]
        acquire(developer, ["report.md"], step_id=leases[0].step.id, lease_token=leases[0].token)
        assert conflicts(developer, ["report.md"], step_id=leases[1].step.id, lease_token=leases[1].token)

    def test_all_or_nothing(self, developer, other_developer):
        acquire(developer, ["b.txt"])
        with pytest.raises(LockConflict) as info:
            acquire(other_developer, ["a.txt", "b.txt", "c.txt"])
        assert [c["path"] for c in info.value.extra["conflicts"]] == ["b.txt"]
        assert info.value.extra["conflicts"][0]["held_by"] == "dev-1"
        assert not FileLock.objects.filter(agent=other_developer.agent).exists()

    def test_fencing_grows_with_every_grant_of_a_path(self, developer, other_developer):
        numbers = []
        for agent in [developer, other_developer, developer]:
            [lock] = acquire(agent, ["shared.md"])
            numbers.append(lock.fencing)
            file_locks.lock_release(lock_id=lock.id, agent=agent.agent)
        assert numbers == sorted(numbers) and len(set(numbers)) == 3


class LockApiTests:
    def test_acquire_list_renew_release(self, developer):
        client = developer.client()
        response = client.post("/v1/locks", {"paths": ["src/./app.py", "docs/"], "mode": "write", "ttl_s": 60},
                               format="json")
        assert response.status_code == 201, response.content
        locks = response.json()["locks"]
        assert [lock["path"] for lock in locks] == ["docs/", "src/app.py"]
        assert all(lock["fencing"] >= 1 and lock["held_by"] == "dev-1" for lock in locks)
        listed = client.get("/v1/locks?project=default&path=docs/readme.md").json()["locks"]
        assert [lock["path"] for lock in listed] == ["docs/"]
        lock_id = locks[0]["id"]
        renewed = client.post(f"/v1/locks/{lock_id}/renew", {"ttl_s": 600}, format="json")
        assert renewed.status_code == 200
        assert renewed.json()["expires_at"] > locks[0]["expires_at"]
        assert client.delete(f"/v1/locks/{lock_id}").status_code == 204
        assert client.delete(f"/v1/locks/{lock_id}").status_code == 204  # already released: no change
        assert [lock["path"] for lock in client.get("/v1/locks").json()["locks"]] == ["src/app.py"]
        assert client.post(f"/v1/locks/{lock_id}/renew", {"ttl_s": 60}, format="json").status_code == 409

    def test_a_conflict_is_409_naming_the_holder(self, developer, other_developer):
        acquire(developer, ["src/"])
        response = other_developer.client().post("/v1/locks", {"paths": ["src/app.py"], "mode": "read"}, format="json")
        assert response.status_code == 409
        body = response.json()
        assert body["error"] == "lock_conflict"
        assert "src/" in body["detail"] and "dev-1" in body["detail"]
        assert body["conflicts"][0]["path"] == "src/" and body["conflicts"][0]["held_by"] == "dev-1"

    @pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../b", "", "a\\b", "a\x00b", "x" * 2000, 7])
    def test_a_bad_path_is_400_invalid_path(self, developer, path):
        response = developer.client().post("/v1/locks", {"paths": ["fine.md", path], "mode": "write"}, format="json")
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_path"
        assert not FileLock.objects.exists()

    def test_an_unknown_project_is_404(self, developer):
        response = developer.client().post("/v1/locks", {"project": "nope", "paths": ["a"], "mode": "write"},
                                           format="json")
        assert response.status_code == 404

    def test_only_the_holder_or_staff_release_or_renew(self, developer, other_developer, owner, owner_client):
        [lock] = acquire(developer, ["a.md"])
        assert other_developer.client().delete(f"/v1/locks/{lock.id}").status_code == 403
        assert other_developer.client().post(f"/v1/locks/{lock.id}/renew", {"ttl_s": 5}, format="json").status_code == 403
        assert owner_client.delete(f"/v1/locks/{lock.id}").status_code == 403  # not staff
        with pytest.raises(Forbidden):
            file_locks.lock_release(lock_id=lock.id, user=owner)
        owner.is_staff = True
        owner.save()
        assert owner_client.delete(f"/v1/locks/{lock.id}").status_code == 204
        lock.refresh_from_db()
        assert lock.release_reason == "forced"

    def test_users_may_not_take_locks(self, owner_client):
        assert owner_client.post("/v1/locks", {"paths": ["a"], "mode": "write"}, format="json").status_code == 403


class ExpiryTests:
    def test_an_expired_lock_blocks_nobody_even_before_the_sweep(self, developer, other_developer):
        [lock] = acquire(developer, ["a.md"])
        FileLock.objects.filter(id=lock.id).update(expires_at=timezone.now() - timedelta(seconds=1))
        [mine] = acquire(other_developer, ["a.md"])
        assert mine.fencing > lock.fencing

    def test_the_sweep_marks_expired_locks_released_and_records_it(self, developer):
        [lock] = acquire(developer, ["a.md"])
        expired_at = timezone.now() - timedelta(seconds=1)
        FileLock.objects.filter(id=lock.id).update(expires_at=expired_at)
        assert file_locks.locks_sweep() == 1
        lock.refresh_from_db()
        assert lock.release_reason == "expired" and lock.released_at == expired_at
        assert Event.objects.filter(kind="locks.expired").exists()
        assert file_locks.locks_sweep() == 0


class StepLockTests:
    def _pull(self, agent):
        return pull.step_pull(agent=agent.agent, roles=["developer"])

    def test_declared_files_come_with_the_lease(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("src/a.py", "write"), ("spec.md", "read")))))
        lease = self._pull(developer)
        locks = {lock.path: lock for lock in FileLock.objects.filter(step=lease.step)}
        assert set(locks) == {"src/a.py", "spec.md"}
        assert locks["spec.md"].mode == "read" and locks["src/a.py"].mode == "write"
        assert all(lock.expires_at == lease.step.lease_expires_at for lock in locks.values())
        event = Event.objects.get(kind="step.leased")
        assert {lock["path"] for lock in event.data["locks"]} == {"src/a.py", "spec.md"}

    def test_two_steps_writing_one_file_never_run_together_while_a_third_runs_alongside(self, developer):
        developer.agent.capacity = 3
        developer.agent.save()
        workflow_creation.workflow_create(spec=workflow_spec(
            step("R1", files=(("report.md", "write"),)),
            step("R2", files=(("report.md", "write"),)),
            step("X", files=(("other.md", "write"),)),
        ))
        first = self._pull(developer)
        second = self._pull(developer)
        assert {first.step.key, second.step.key} == {"R1", "X"}
        assert isinstance(self._pull(developer), pull.PullMiss)  # R2 waits for report.md
        r1 = first if first.step.key == "R1" else second
        reports.step_report(step_id=r1.step.id, agent=developer.agent, lease_token=r1.token,
                             outcome=reports.Outcome(status="completed"))
        third = self._pull(developer)
        assert third.step.key == "R2"

    def test_a_step_blocked_by_an_agents_lock_is_passed_over(self, developer, other_developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("src/",  "write"),)), step("B")))
        acquire(other_developer, ["src/app.py"], "read")
        lease = self._pull(developer)
        assert lease.step.key == "B"

    @pytest.mark.parametrize("end", ["completed", "failed", "released", "cancelled", "expired"])
    def test_locks_end_with_the_step(self, developer, other_developer, end):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("a.md", "write"),), max_attempts=1)))
        lease = self._pull(developer)
        [extra] = acquire(developer, ["notes/"], step_id=lease.step.id, lease_token=lease.token)
        assert extra.step_id == lease.step.id and extra.expires_at == lease.step.lease_expires_at
        if end in ("completed", "failed"):
            reports.step_report(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token,
                                 outcome=reports.Outcome(status=end))
        elif end == "released":
            leases.step_release(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token)
        elif end == "cancelled":
            workflow_control.workflow_cancel(workflow_id=workflow.id)
        else:
            Step.objects.filter(id=lease.step.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
            leases.leases_sweep()
        assert not FileLock.objects.filter(step=lease.step, released_at__isnull=True).exists()
        acquire(other_developer, ["a.md", "notes/x"])  # free again
        assert Event.objects.filter(kind="locks.released", step=lease.step).exists()

    def test_a_heartbeat_renews_the_steps_locks(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("a.md", "write"),))))
        lease = self._pull(developer)
        FileLock.objects.filter(step=lease.step).update(expires_at=timezone.now() + timedelta(seconds=3))
        result = leases.step_heartbeat(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token)
        assert FileLock.objects.get(step=lease.step).expires_at == result["expires_at"]

    def test_locks_under_a_lease_need_the_current_token(self, developer, other_developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        lease = self._pull(developer)
        response = developer.client().post("/v1/locks", {"paths": ["x"], "mode": "write", "step_id": str(lease.step.id),
                                                         "lease_token": "ls_wrong"}, format="json")
        assert response.status_code == 409 and response.json()["error"] == "stale_lease"
        response = other_developer.client().post("/v1/locks", {"paths": ["x"], "mode": "write",
                                                               "step_id": str(lease.step.id),
                                                               "lease_token": lease.token}, format="json")
        assert response.status_code == 403
        response = developer.client().post("/v1/locks", {"paths": ["x"], "mode": "write",
                                                         "step_id": str(lease.step.id)}, format="json")
        assert response.status_code == 400


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
class WaitingTests:
    def _in_thread(self, fn, results, key):
        def run():
            try:
                results[key] = fn()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                results[key] = exc
            finally:
                connection.close()
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def test_a_waiting_request_is_granted_when_the_holder_releases(self):
        holder = make_agent("holder", ["developer"])
        waiter = make_agent("waiter", ["developer"])
        [lock] = acquire(holder, ["a.md"])
        results: dict = {}
        started = time.monotonic()
        thread = self._in_thread(lambda: acquire(waiter, ["a.md"], wait_s=15), results, "waiter")
        time.sleep(1.0)
        assert thread.is_alive()
        assert LockWaiter.objects.count() == 1
        file_locks.lock_release(lock_id=lock.id, agent=holder.agent)
        thread.join(timeout=20)
        assert isinstance(results["waiter"], list), results
        assert time.monotonic() - started < 10
        assert results["waiter"][0].fencing > lock.fencing
        assert LockWaiter.objects.count() == 0

    def test_a_waiting_writer_is_not_starved_by_later_readers(self):
        reader = make_agent("reader", ["developer"])
        writer = make_agent("writer", ["developer"])
        late_reader = make_agent("late-reader", ["developer"])
        [read_lock] = acquire(reader, ["doc.md"], "read")
        results: dict = {}
        thread = self._in_thread(lambda: acquire(writer, ["doc.md"], "write", wait_s=15), results, "writer")
        time.sleep(1.0)
        # A reader arriving after the queued writer must not slip in, although it is compatible with the reader.
        with pytest.raises(LockConflict) as info:
            acquire(late_reader, ["doc.md"], "read")
        assert info.value.extra["conflicts"][0].get("queued") is True
        file_locks.lock_release(lock_id=read_lock.id, agent=reader.agent)
        thread.join(timeout=20)
        assert isinstance(results["writer"], list), results

    def test_a_wait_that_runs_out_is_a_conflict_and_leaves_no_waiter(self):
        holder = make_agent("holder", ["developer"])
        other = make_agent("other", ["developer"])
        acquire(holder, ["a.md"])
        started = time.monotonic()
        with pytest.raises(LockConflict):
            acquire(other, ["a.md"], wait_s=1)
        assert time.monotonic() - started >= 0.9
        assert LockWaiter.objects.count() == 0

    def test_a_waiting_request_is_granted_when_the_lock_expires(self):
        holder = make_agent("holder", ["developer"])
        other = make_agent("other", ["developer"])
        acquire(holder, ["a.md"], ttl_s=2)
        started = time.monotonic()
        [lock] = acquire(other, ["a.md"], wait_s=10)
        assert 1.0 < time.monotonic() - started < 8
        assert lock.agent_id == other.agent.id
