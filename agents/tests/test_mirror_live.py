"""The workspace mirror against a real server: workers on separate mirrors, commands, refused writes."""

import hashlib
import os
from pathlib import Path

import pytest

from agents.client import Client
from agents.mirror import STATE_DIR, Mirror
from agents.runtime import tool_locker
from agents.worker import Step as LeasedStep, Worker
from agents.tests.test_worker_live import WorkerProcess, _wait_for
from agents.tools import CommandPolicy, ToolError, Workspace
from coordination.models import FileLock, FileVersion, Iteration, Step, Workflow
from coordination.services import file_locks, projects, workflow_creation, workspace

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _mirror_tree(root: Path) -> dict[str, str]:
    tree = {}
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            path = Path(current) / name
            tree[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def _server_tree(client: Client, project: str) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in client.files(project)["files"]}


def _another_agent_writes(agent, project: str, path: str, content: bytes) -> FileLock:
    """Another agent (elsewhere) takes a write lock on `path` and writes it; it keeps the lock."""
    lock = file_locks.locks_acquire(agent=agent, paths=[path], mode="write", project_name=project)[0]
    workspace.workspace_write(project_name=project, changes=[workspace.Change(path, content, lock.fencing)],
                              agent=agent)
    return lock


class CountingClient(Client):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []
        self.answers: list[tuple[int, int]] = []  # (status, body bytes)

    def request(self, method, path, **kwargs):
        self.requests.append(f"{method} {path}")
        response = super().request(method, path, **kwargs)
        self.answers.append((response.status_code, len(response.content)))
        return response


@pytest.fixture
def holder(make_agent):
    return make_agent("holder", ["developer"])


@pytest.fixture
def intruder(make_agent):
    """Another agent, working on the same project from another machine."""
    return make_agent("intruder", ["developer"])


def _pulled_workspace(live_am, agent, tmp_path, project, *, commands=False):
    """What the runtime sets up for a step: the pull, the synced mirror, the tools with the lease's locks
    (taking more as the runtime does, without waiting for another holder)."""
    client = Client(live_am, agent.token)
    pulled = client.pull(agent.agent.roles, wait=5)
    assert pulled is not None and pulled.workflow["project"] == project
    mirror = Mirror(tmp_path / "mirror", project, client)
    mirror.sync()
    worker = Worker(live_am, agent.token, workspace=tmp_path, lock_wait_s=0, client=client)
    tools = Workspace(mirror.root, mirror=mirror, locks=pulled.lease["locks"],
                      lock_writer=tool_locker(LeasedStep(worker, pulled), wait_s=0),
                      commands=CommandPolicy(timeout_s=30) if commands else None)
    return client, pulled, mirror, tools


class MirrorSyncTests:
    def test_a_sync_fetches_only_what_changed(self, live_am, tmp_path, intruder):
        projects.project_create(name="syncing")
        _another_agent_writes(intruder.agent, "syncing", "a.txt", b"a\n")
        lock = _another_agent_writes(intruder.agent, "syncing", "b/b.txt", b"b\n")
        client = CountingClient(live_am, intruder.token)
        mirror = Mirror(tmp_path, "syncing", client)
        assert mirror.sync() == {"fetched": 2, "deleted": 0}
        client.requests.clear()
        assert mirror.sync() == {"fetched": 0, "deleted": 0}
        assert client.requests == ["GET /v1/projects/syncing/files"], "nothing changed: one listing request"
        workspace.workspace_write(project_name="syncing", agent=intruder.agent,
                                  changes=[workspace.Change("b/b.txt", None, lock.fencing)])
        other = file_locks.locks_acquire(agent=intruder.agent, paths=["a.txt"], mode="write", project_name="syncing")
        workspace.workspace_write(project_name="syncing", agent=intruder.agent,
                                  changes=[workspace.Change("a.txt", b"a2\n", other[0].fencing)])
        (tmp_path / "syncing" / "stray.txt").write_text("not on the server")
        client.requests.clear()
        assert mirror.sync() == {"fetched": 1, "deleted": 2}
        assert client.requests == ["GET /v1/projects/syncing/files", "GET /v1/projects/syncing/files/a.txt"]
        assert _mirror_tree(mirror.root) == _server_tree(client, "syncing")
        assert not (mirror.root / "b").exists(), "a directory emptied by deletions goes too"
        client.close()

    def test_a_re_read_of_a_file_as_synced_brings_no_body_unless_the_server_changed_it(self, live_am, tmp_path,
                                                                                      intruder):
        projects.project_create(name="rereads")
        lock = _another_agent_writes(intruder.agent, "rereads", "a.txt", b"a" * 4000)
        client = CountingClient(live_am, intruder.token)
        mirror = Mirror(tmp_path, "rereads", client)
        mirror.sync()
        client.answers.clear()
        mirror.refresh(["a.txt"])
        assert client.answers == [(304, 0)], "the mirror's copy is the server's: asked by its sha256, no body"
        assert (mirror.root / "a.txt").read_bytes() == b"a" * 4000
        workspace.workspace_write(project_name="rereads", agent=intruder.agent,
                                  changes=[workspace.Change("a.txt", b"b" * 3000, lock.fencing)])
        client.answers.clear()
        mirror.refresh(["a.txt"])
        assert client.answers == [(200, 3000)] and (mirror.root / "a.txt").read_bytes() == b"b" * 3000
        client.answers.clear()
        mirror.refresh(["a.txt"])
        assert client.answers == [(304, 0)], "the state follows what was fetched"
        (mirror.root / "a.txt").write_bytes(b"edited here")  # not sent: a re-read gives the server's content
        client.answers.clear()
        mirror.refresh(["a.txt"])
        assert client.answers == [(200, 3000)] and (mirror.root / "a.txt").read_bytes() == b"b" * 3000
        synced = (mirror.root / "a.txt").stat()
        (mirror.root / "a.txt").write_bytes(b"c" * 3000)  # same size, and the mtime put back: still told apart
        os.utime(mirror.root / "a.txt", ns=(synced.st_atime_ns, synced.st_mtime_ns))
        client.answers.clear()
        mirror.refresh(["a.txt"])
        assert client.answers == [(200, 3000)] and (mirror.root / "a.txt").read_bytes() == b"b" * 3000
        workspace.workspace_write(project_name="rereads", agent=intruder.agent,
                                  changes=[workspace.Change("a.txt", None, lock.fencing)])
        mirror.refresh(["a.txt"])
        assert not (mirror.root / "a.txt").exists() and _mirror_tree(mirror.root) == _server_tree(client, "rereads")
        client.close()


class RefusedWriteTests:
    def test_a_refused_write_leaves_the_mirror_as_the_server_holds_it(self, live_am, tmp_path, holder, intruder, step,
                                                                      workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(
            step("edit", files=(("src/app.py", "write"),)), name="Refused", project="refusals"))
        client, pulled, mirror, tools = _pulled_workspace(live_am, holder, tmp_path, "refusals")
        assert tools.write_file("src/app.py", "v1\n") == "Wrote 3 bytes to src/app.py."
        assert client.file_bytes("refusals", "src/app.py") == b"v1\n"
        # The lease's lock is taken away behind the tool's back; another agent locks and writes the file.
        lease_lock = FileLock.objects.get(step_id=pulled.step_id, path="src/app.py")
        file_locks.lock_release(lock_id=lease_lock.id, agent=holder.agent)
        _another_agent_writes(intruder.agent, "refusals", "src/app.py", b"intruder\n")
        with pytest.raises(ToolError, match="stale_fencing|lock_required") as refused:
            tools.write_file("src/app.py", "v2\n")
        assert "Nothing was written" in str(refused.value)
        assert (mirror.root / "src/app.py").read_text() == "intruder\n"
        assert _mirror_tree(mirror.root) == _server_tree(client, "refusals")
        # The next attempt asks for a new lock, which the intruder holds: refused, nothing written.
        with pytest.raises(ToolError, match="lock_conflict"):
            tools.write_file("src/app.py", "v3\n")
        with pytest.raises(ToolError, match="lock_conflict"):
            tools.delete_file("src/app.py")
        assert _mirror_tree(mirror.root) == _server_tree(client, "refusals") and len(_mirror_tree(mirror.root)) == 1
        client.close()

    def test_a_refused_batch_sends_nothing_and_puts_the_mirror_back(self, live_am, tmp_path, holder, intruder, step,
                                                                    workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(
            step("run", files=(("src/", "write"),)), name="Refused batch", project="batches"))
        client, pulled, mirror, tools = _pulled_workspace(live_am, holder, tmp_path, "batches", commands=True)
        tools.write_file("src/app.py", "print('v1')\n")
        _another_agent_writes(intruder.agent, "batches", "notes/x.txt", b"theirs\n")
        version = client.files("batches")["version"]
        # A lock conflict: the command changed a file another agent holds.
        with pytest.raises(ToolError, match="lock_conflict") as refused:
            tools.run_command("echo mine > notes/x.txt && echo new > src/new.py && echo 'print(2)' > src/app.py")
        assert "exit code 0" in str(refused.value) and "back as the server holds it" in str(refused.value)
        assert client.files("batches")["version"] == version, "nothing was sent"
        assert (mirror.root / "notes/x.txt").read_text() == "theirs\n" and not (mirror.root / "src/new.py").exists()
        assert _mirror_tree(mirror.root) == _server_tree(client, "batches")
        # A stale fencing number: the lease's lock on src/ was released behind the tool's back.
        lease_lock = FileLock.objects.get(step_id=pulled.step_id, path="src/")
        file_locks.lock_release(lock_id=lease_lock.id, agent=holder.agent)
        with pytest.raises(ToolError, match="stale_fencing|lock_required"):
            tools.run_command("rm src/app.py && echo new > src/new.py")
        assert client.files("batches")["version"] == version
        assert (mirror.root / "src/app.py").read_text() == "print('v1')\n"
        assert _mirror_tree(mirror.root) == _server_tree(client, "batches")
        client.close()


class MirrorWorkerTests:
    def test_two_workers_on_two_mirrors_build_one_workspace(self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("build", role="developer", files=(("src/app.py", "write"),)),
            step("polish", "build", role="reviewer", files=(("src/app.py", "write"),)),
            name="Two machines", project="two-machines"))
        first, second = make_agent("machine-a", ["developer"]), make_agent("machine-b", ["reviewer"])
        workers = [WorkerProcess(live_am, agent, tmp_path / directory, tmp_path / f"{directory}.log")
                   for agent, directory in ((first, "a"), (second, "b"))]
        try:
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=60), \
                [w.output()[-2000:] for w in workers]
        finally:
            assert [worker.stop() for worker in workers] == [0, 0]
        built = (tmp_path / "a" / "two-machines" / "src/app.py").read_text()
        client = Client(live_am, first.token)
        final = client.file_bytes("two-machines", "src/app.py").decode()
        assert "class NoteBook" in built
        # The second machine read the first one's file from its own mirror, and edited it.
        polish = Step.objects.get(workflow=workflow, key="polish")
        read = Iteration.objects.get(attempt__step=polish, action__contains='"read_file"')
        assert read.observation == built
        assert final.startswith(built.rstrip()) and "Edited by the reviewer" in final
        assert _mirror_tree(tmp_path / "b" / "two-machines") == _server_tree(client, "two-machines")
        assert list(FileVersion.objects.filter(project=workflow.project, path="src/app.py")
                    .order_by("version").values_list("step__key", flat=True)) == ["build", "polish"]
        client.close()

    def test_a_tester_runs_its_tests_and_what_they_produce_is_saved_under_locks(
            self, live_am, tmp_path, make_agent, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("build", role="developer", files=(("src/app.py", "write"),)),
            step("test", "build", role="tester", files=(("tests/test_app.py", "write"), ("src/", "read"))),
            name="Run the tests", project="tested"))
        developer, tester = make_agent("dev-box", ["developer"]), make_agent("test-box", ["tester"])
        workers = [WorkerProcess(live_am, developer, tmp_path / "dev", tmp_path / "dev.log"),
                   WorkerProcess(live_am, tester, tmp_path / "test", tmp_path / "test.log",
                                 extra=("--allow-commands",))]
        try:
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=60), \
                [w.output()[-2000:] for w in workers]
        finally:
            assert [worker.stop() for worker in workers] == [0, 0]
        test = Step.objects.get(workflow=workflow, key="test")
        ran = Iteration.objects.get(attempt__step=test, action__contains='"run_command"')
        assert "python tests/test_app.py" in ran.action and "exit code 0" in ran.observation
        assert "2 passed, 0 failed" in ran.observation and "reports/test_app.txt (written)" in ran.observation
        client = Client(live_am, tester.token)
        assert client.file_bytes("tested", "reports/test_app.txt") == b"2 passed, 0 failed\n"
        report = FileVersion.objects.get(project=workflow.project, path="reports/test_app.txt")
        assert report.step_id == test.id and report.fencing == report.lock.fencing
        assert report.lock.mode == "write" and report.lock.step_id == test.id, "locked under the step's lease"
        assert "exit code 0" in test.results.get().final_result
        assert "reports/test_app.txt" in test.outputs["files_written"]
        assert set(_server_tree(client, "tested")) == {"src/app.py", "tests/test_app.py", "reports/test_app.txt"}
        assert _mirror_tree(tmp_path / "test" / "tested") == _server_tree(client, "tested")
        # The developer's worker was started without --allow-commands: it was never offered the tool.
        build = Step.objects.get(workflow=workflow, key="build")
        assert not Iteration.objects.filter(attempt__step=build, action__contains="run_command").exists()
        client.close()
