"""The workspace contract over HTTP: read, write, delete, batch, history, versions, archive, ETags,
preconditions and every error (shared/api-v1.md, "Projects and their workspace")."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import time
from urllib.parse import quote

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from coordination.models import Event, FileVersion, Project, WorkspaceFile
from coordination.services import file_locks, projects, workflow_creation, workflow_specs
from coordination.tests.workspace_agent import Worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def webapp(db) -> Project:
    return projects.project_create(name="webapp")


@pytest.fixture
def dev(webapp) -> Worker:
    return Worker("dev-1")


@pytest.fixture
def other(webapp) -> Worker:
    return Worker("dev-2")


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class WriteAndReadTests:
    def test_it_writes_under_a_lock_and_reads_the_bytes_back_with_etag_and_version(self, dev):
        lock = dev.lock("src/app.py")[0]
        written = dev.put("src/app.py", b"print('hi')\n", lock["fencing"])
        assert written.status_code == 200, written.content
        assert written.json() == {"path": "src/app.py", "sha256": _sha(b"print('hi')\n"), "size": 12, "version": 1}
        read = dev.client.get("/v1/projects/webapp/files/src/app.py")
        assert read.status_code == 200 and read.content == b"print('hi')\n"
        assert read["ETag"] == '"' + _sha(b"print('hi')\n") + '"' and read["X-AM-Version"] == "1"
        assert dev.client.get("/v1/projects/webapp/files/src/app.py", HTTP_IF_NONE_MATCH=read["ETag"]).status_code == 304
        tree = dev.client.get("/v1/projects/webapp/files").json()
        assert tree["version"] == 1
        assert [(f["path"], f["size"], f["agent"], f["version"]) for f in tree["files"]] == [("src/app.py", 12, "dev-1", 1)]
        assert Project.objects.get(name="webapp").workspace_version == 1

    def test_a_directory_lock_covers_the_files_under_it_and_versions_grow_by_one(self, dev):
        fencing = dev.lock("src/")[0]["fencing"]
        for index, name in enumerate(["a.py", "b.py", "deep/c.py"], start=1):
            response = dev.put(f"src/{name}", name.encode(), fencing)
            assert response.status_code == 200 and response.json()["version"] == index
        listed = dev.client.get("/v1/projects/webapp/files?prefix=src/deep/").json()
        assert [f["path"] for f in listed["files"]] == ["src/deep/c.py"]

    def test_binary_and_invalid_utf8_are_stored_byte_for_byte(self, dev):
        fencing = dev.lock("bin/")[0]["fencing"]
        blobs = {"bin/logo.png": bytes(range(256)) * 4, "bin/latin1.txt": "café".encode("latin-1"),
                 "bin/empty": b""}
        for path, content in blobs.items():
            assert dev.put(path, content, fencing).status_code == 200
        for path, content in blobs.items():
            assert dev.client.get(f"/v1/projects/webapp/files/{path}").content == content

    def test_the_tree_and_a_file_as_they_were_at_an_older_version(self, dev):
        fencing = dev.lock("doc.md")[0]["fencing"]
        dev.put("doc.md", b"one", fencing)
        dev.put("doc.md", b"two", fencing)
        assert dev.delete("doc.md", fencing).status_code == 200
        assert dev.client.get("/v1/projects/webapp/files/doc.md").status_code == 404
        assert dev.client.get("/v1/projects/webapp/files/doc.md?version=1").content == b"one"
        assert dev.client.get("/v1/projects/webapp/files/doc.md?version=2").content == b"two"
        assert [f["path"] for f in dev.client.get("/v1/projects/webapp/files?version=2").json()["files"]] == ["doc.md"]
        assert dev.client.get("/v1/projects/webapp/files").json()["files"] == []
        history = dev.client.get("/v1/projects/webapp/files/doc.md/history").json()["versions"]
        assert [(h["version"], h["deleted"], h["fencing"]) for h in history] == [
            (3, True, fencing), (2, False, fencing), (1, False, fencing)]
        assert dev.client.get("/v1/projects/webapp/files?version=9").status_code == 400

    def test_preconditions_if_match_and_if_none_match(self, dev):
        fencing = dev.lock("x.txt")[0]["fencing"]
        assert dev.put("x.txt", b"v1", fencing, **{"If-None-Match": "*"}).status_code == 200
        refused = dev.put("x.txt", b"again", fencing, **{"If-None-Match": "*"})
        assert refused.status_code == 412 and refused.json()["error"] == "precondition_failed"
        assert refused.json()["sha256"] == _sha(b"v1")
        stale = dev.put("x.txt", b"v2", fencing, **{"If-Match": f'"{_sha(b"other")}"'})
        assert stale.status_code == 412 and stale.json()["sha256"] == _sha(b"v1")
        assert dev.put("x.txt", b"v2", fencing, **{"If-Match": f'"{_sha(b"v1")}"'}).status_code == 200
        assert dev.client.get("/v1/projects/webapp/files/x.txt").content == b"v2"

    def test_a_batch_applies_as_one_version_all_or_none(self, dev, other):
        mine = dev.lock("a.txt", "b.txt", "c.txt")
        fencing = {lock["path"]: lock["fencing"] for lock in mine}
        dev.put("c.txt", b"old", fencing["c.txt"])
        theirs = other.lock("z.txt")[0]["fencing"]
        refused = dev.batch([{"path": "a.txt", "content": "A", "fencing": fencing["a.txt"]},
                             {"path": "z.txt", "content": "Z", "fencing": theirs}])
        assert refused.status_code == 409 and refused.json()["error"] == "stale_fencing"
        assert not FileVersion.objects.filter(path="a.txt").exists(), "nothing of a refused batch is stored"
        done = dev.batch([{"path": "a.txt", "content": "A", "fencing": fencing["a.txt"]},
                          {"path": "b.txt", "content_b64": base64.b64encode(b"\x00\x01").decode(),
                           "fencing": fencing["b.txt"]},
                          {"path": "c.txt", "delete": True, "fencing": fencing["c.txt"]}])
        assert done.status_code == 200, done.content
        assert done.json()["version"] == 2 and {f["version"] for f in done.json()["files"]} == {2}
        assert dev.client.get("/v1/projects/webapp/files/b.txt").content == b"\x00\x01"

    def test_the_archive_holds_the_tree_at_a_version(self, dev):
        fencing = dev.lock("./")[0]["fencing"]
        dev.put("README.md", b"# hi\n", fencing)
        dev.put("src/main.py", b"print(1)\n", fencing)
        dev.delete("README.md", fencing)
        for version, expected in ((2, {"README.md": b"# hi\n", "src/main.py": b"print(1)\n"}),
                                  (None, {"src/main.py": b"print(1)\n"})):
            url = "/v1/projects/webapp/archive" + (f"?version={version}" if version else "")
            response = dev.client.get(url)
            assert response.status_code == 200 and response["Content-Type"] == "application/gzip"
            with tarfile.open(fileobj=io.BytesIO(b"".join(response.streaming_content)), mode="r:gz") as archive:
                assert {m.name: archive.extractfile(m).read() for m in archive.getmembers()} == expected


class WriteRefusalTests:
    def test_no_fencing_an_unknown_one_or_a_read_lock_is_lock_required(self, dev):
        read_lock = dev.lock("r.txt", mode="read")[0]
        for fencing in (None, 999):
            response = dev.put("w.txt", b"x", fencing)
            assert response.status_code == 409 and response.json()["error"] == "lock_required", response.content
        response = dev.put("r.txt", b"x", read_lock["fencing"])
        assert response.status_code == 409 and response.json()["error"] == "lock_required"
        assert "read lock" in response.json()["detail"]
        assert not FileVersion.objects.exists()

    def test_a_released_or_foreign_lock_is_stale_fencing_with_the_current_number(self, dev, other):
        lock = dev.lock("s.txt")[0]
        file_locks.lock_release(lock_id=lock["id"], agent=dev.agent)
        again = other.lock("s.txt")[0]
        stale = dev.put("s.txt", b"mine", lock["fencing"])
        assert stale.status_code == 409 and stale.json()["error"] == "stale_fencing"
        assert stale.json()["current_fencing"] == again["fencing"]
        foreign = dev.put("s.txt", b"mine", again["fencing"])
        assert foreign.status_code == 409 and foreign.json()["error"] == "stale_fencing"
        assert "another agent" in foreign.json()["detail"]
        assert not FileVersion.objects.exists()

    @pytest.mark.parametrize("path", ["../etc/passwd", "a/../../b", "/abs.txt", "a%00b", "a%0Ab", "a%09b",
                                      "dir/", "x" * 1100])
    def test_a_bad_path_is_invalid_path(self, dev, path):
        fencing = dev.lock("./")[0]["fencing"]
        response = dev.put(path, b"x", fencing)
        assert response.status_code == 400, response.content
        assert response.json()["error"] == "invalid_path"
        assert not FileVersion.objects.exists()

    def test_a_body_over_the_limit_is_too_large(self, dev, settings):
        settings.AM_MAX_FILE_BYTES = 2048
        fencing = dev.lock("big.bin")[0]["fencing"]
        response = dev.put("big.bin", b"x" * 4096, fencing)
        assert response.status_code == 413 and response.json()["error"] == "too_large"
        assert not FileVersion.objects.exists()

    def test_a_missing_project_is_not_found_and_people_do_not_write(self, dev, webapp):
        assert dev.put("a.txt", b"x", 1, project="nope").status_code == 404
        assert dev.client.get("/v1/projects/nope/files").status_code == 404
        person = APIClient()
        person.force_authenticate(get_user_model().objects.create_user(username="ann", password="pw-ann-12345"))
        refused = person.generic("PUT", "/v1/projects/webapp/files/a.txt", b"x", HTTP_X_AM_FENCING="1")
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"

    def test_an_unknown_batch_field_or_two_contents_is_refused(self, dev):
        fencing = dev.lock("a.txt")[0]["fencing"]
        for change in ({"path": "a.txt", "content": "x", "fencing": fencing, "mode": "w"},
                       {"path": "a.txt", "content": "x", "content_b64": "eA==", "fencing": fencing},
                       {"path": "a.txt", "content_b64": "not base64!", "fencing": fencing}):
            response = dev.batch([change])
            assert response.status_code == 400, response.content
        assert not FileVersion.objects.exists()


class ZombieWriteTests:
    def test_a_paused_holder_cannot_overwrite_after_its_lock_expired_and_was_granted_again(self, dev, other):
        old = dev.lock("shared.txt", ttl_s=1)[0]
        time.sleep(1.2)  # A "pauses" past its lock's expiry
        new = other.lock("shared.txt")[0]
        assert new["fencing"] > old["fencing"]
        assert other.put("shared.txt", b"B's work", new["fencing"]).status_code == 200
        zombie = dev.put("shared.txt", b"A's stale work", old["fencing"])
        assert zombie.status_code == 409 and zombie.json()["error"] == "stale_fencing"
        assert zombie.json()["current_fencing"] == new["fencing"]
        assert dev.client.get("/v1/projects/webapp/files/shared.txt").content == b"B's work"

    def test_a_lock_released_by_staff_refuses_the_whole_batch(self, dev):
        locks = {lock["path"]: lock for lock in dev.lock("one.txt", "two.txt")}
        staff = get_user_model().objects.create_user(username="ops", password="pw-ops-12345", is_staff=True)
        file_locks.lock_release(lock_id=locks["two.txt"]["id"], user=staff)
        refused = dev.batch([{"path": "one.txt", "content": "1", "fencing": locks["one.txt"]["fencing"]},
                             {"path": "two.txt", "content": "2", "fencing": locks["two.txt"]["fencing"]}])
        assert refused.status_code == 409 and refused.json()["error"] == "stale_fencing"
        assert "released" in refused.json()["detail"]
        assert not FileVersion.objects.exists() and not WorkspaceFile.objects.exists()


class StepChangeTests:
    def test_a_steps_declared_files_come_with_the_lease_and_its_changes_carry_diffs(self, dev, webapp):
        spec = workflow_specs.WorkflowSpec(name="edit", project="webapp", steps=(workflow_specs.StepSpec(
            key="A", name="edit", role="developer", files=(workflow_specs.FileSpec(path="app.py"),)),))
        workflow = workflow_creation.workflow_create(spec=spec)
        pulled = dev.client.get("/v1/tasks/developer/ready").json()
        [lock] = pulled["lease"]["locks"]
        assert lock["path"] == "app.py" and lock["mode"] == "write"
        assert dev.put("app.py", b"a = 1\n", lock["fencing"]).status_code == 200
        assert dev.put("app.py", b"a = 2\nb = 3\n", lock["fencing"]).status_code == 200
        changes = dev.client.get(f"/v1/steps/{pulled['step']['id']}/changes").json()["changes"]
        assert [c["version"] for c in changes] == [1, 2]
        assert changes[0]["sha256_before"] is None and changes[1]["sha256_before"] == _sha(b"a = 1\n")
        assert "-a = 1\n+a = 2\n+b = 3\n" in changes[1]["diff"]
        event = Event.objects.filter(workflow=workflow, kind="files.changed").order_by("seq").last()
        assert event.data["paths"] == ["app.py"] and event.data["step"] == "A" and event.data["agent"] == "dev-1"
        report = dev.client.post("/v1/report_result", {"step_id": pulled["step"]["id"],
                                                       "lease_token": pulled["lease"]["token"],
                                                       "status": "completed", "final_result": "ok"}, format="json")
        assert report.status_code == 200
        late = dev.put("app.py", b"after the report", lock["fencing"])
        assert late.status_code == 409 and late.json()["error"] == "stale_fencing"


class ProjectTests:
    def test_projects_are_listed_created_and_shown(self, dev, webapp):
        submitter = Worker("pipeline", can_submit=True)
        created = submitter.client.post("/v1/projects", {"name": "mobile", "description": "the app"}, format="json")
        assert created.status_code == 201 and created.json()["name"] == "mobile" and created.json()["version"] == 0
        assert submitter.client.post("/v1/projects", {"name": "mobile"}, format="json").status_code == 409
        assert submitter.client.post("/v1/projects", {"name": "bad name"}, format="json").status_code == 400
        assert dev.client.post("/v1/projects", {"name": "nope"}, format="json").status_code == 403
        names = [p["name"] for p in submitter.client.get("/v1/projects").json()]
        assert {"default", "mobile", "webapp"} <= set(names)
        assert submitter.client.get("/v1/projects/mobile").json()["description"] == "the app"
        assert submitter.client.get("/v1/projects/" + quote("nope")).status_code == 404
