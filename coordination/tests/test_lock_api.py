"""The /v1/locks API: acquire, list, renew, release, and its refusals."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from coordination.errors import Forbidden
from coordination.models import FileLock
from coordination.services import file_locks
from coordination.tests.agent_calls import acquire

pytestmark = pytest.mark.django_db


class LockApiTests:
    def test_it_acquires_lists_renews_and_releases(self, developer):
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

    def test_it_answers_a_conflict_with_409_naming_the_holder(self, developer, other_developer):
        acquire(developer, ["src/"])
        response = other_developer.client().post("/v1/locks", {"paths": ["src/app.py"], "mode": "read"}, format="json")
        assert response.status_code == 409
        body = response.json()
        assert body["error"] == "lock_conflict"
        assert "src/" in body["detail"] and "dev-1" in body["detail"]
        assert body["conflicts"][0]["path"] == "src/" and body["conflicts"][0]["held_by"] == "dev-1"

    @pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../b", "", "a\\b", "a\x00b", "x" * 2000, 7])
    def test_it_refuses_a_bad_path_with_400_invalid_path(self, developer, path):
        response = developer.client().post("/v1/locks", {"paths": ["fine.md", path], "mode": "write"}, format="json")
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_path"
        assert not FileLock.objects.exists()

    def test_it_answers_404_for_an_unknown_project(self, developer):
        response = developer.client().post("/v1/locks", {"project": "nope", "paths": ["a"], "mode": "write"},
                                           format="json")
        assert response.status_code == 404

    def test_it_lets_only_the_holder_or_staff_release_or_renew(self, developer, other_developer, owner, owner_client):
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

    def test_a_holders_release_is_one_statement_with_its_event_and_the_waiters_wake_up(self, developer, step,
                                                                                      workflow_spec):
        from coordination.models import Event
        from coordination.services import workflow_creation
        from coordination.tests.agent_calls import pull

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, token = pull(developer)
        [free] = acquire(developer, ["notes.md"])
        [under_step] = acquire(developer, ["src/a.py"], step_id=step_id, lease_token=token)
        for lock, workflow_id in ((free, None), (under_step, workflow.id)):
            with CaptureQueriesContext(connection) as queries:
                released = file_locks.lock_release(lock_id=lock.id, agent=developer.agent)
            assert len(queries) == 1, [query["sql"][:80] for query in queries]
            assert "pg_notify('am_locks'" in queries[0]["sql"]
            stored = FileLock.objects.get(id=lock.id)
            assert stored.released_at is not None and stored.release_reason == "released"
            assert (released.id, released.released_at, released.path) == (lock.id, stored.released_at, lock.path)
            event = Event.objects.filter(kind="locks.released").latest("id")
            assert (event.workflow_id, event.step_id, event.agent_id) == (workflow_id, lock.step_id,
                                                                          developer.agent.id)
            assert event.data == {"project": "default", "reason": "released", "by_agent": "dev-1",
                                  "locks": [{"path": lock.path, "mode": "write", "fencing": lock.fencing}]}
        assert Event.objects.filter(workflow_id=workflow_id).latest("seq") == event  # numbered after the rest

    def test_it_refuses_locks_to_people(self, owner_client):
        assert owner_client.post("/v1/locks", {"paths": ["a"], "mode": "write"}, format="json").status_code == 403


class ProjectLockKeyTests:
    def test_the_sql_key_of_a_project_found_by_name_is_the_one_every_other_path_locks(self):
        """A grant that finds its project by name locks the same advisory key as one that starts from its id."""
        from coordination.models import Project
        from coordination.services import lock_order

        for name in ("keyed-a", "keyed-b", "keyed-c", "keyed-d"):
            project = Project.objects.create(name=name)
            from django.db import transaction

            key = lock_order.advisory_key(project.id) % (1 << 64)
            with transaction.atomic():
                found, _now = lock_order.lock_project_named(name)
                assert found.id == project.id
                with connection.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                   "AND pid = pg_backend_pid() AND classid::bigint = %s AND objid::bigint = %s",
                                   [key >> 32, key & 0xFFFFFFFF])
                    assert cursor.fetchone()[0] == 1
        assert lock_order.lock_project_named("no-such-project") is None
