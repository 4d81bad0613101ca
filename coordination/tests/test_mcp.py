"""The MCP endpoint, through the official `mcp` client SDK against a live server (daphne) over HTTP."""

import asyncio
import base64
import hashlib
import json
from datetime import timedelta

import httpx2
import pytest
from django.utils import timezone
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from coordination import workspace_reads
from coordination.services import file_locks, leases, projects, pull, workflow_creation, workspace
from coordination.models import FileVersion, Project, Result, Step, WorkspaceFile

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


async def _session_calls(url: str, token: str, calls):
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with streamable_http_client(f"{url}/mcp", http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                return await calls(session)


def _json(result) -> dict:
    assert not result.is_error, result.content[0].text
    return json.loads(result.content[0].text)


class MCPTests:
    def test_an_mcp_client_works_a_workflow_through_the_tools_alone(self, live_am, make_agent, step, workflow_spec):
        agent = make_agent("mcp-worker", ["developer"], capacity=1)
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), name="Via MCP"))

        async def calls(session):
            names = {tool.name for tool in (await session.list_tools()).tools}
            prompts = {prompt.name for prompt in (await session.list_prompts()).prompts}
            ready = _json(await session.call_tool("list_ready", {"role": "developer"}))
            assert [s["key"] for s in ready["steps"]] == ["A"]
            done = []
            for _ in range(2):
                pulled = _json(await session.call_tool("pull_step", {"role": "developer", "wait_s": 5}))
                step_id, token = pulled["step"]["id"], pulled["lease"]["token"]
                beat = _json(await session.call_tool("heartbeat", {"step_id": step_id, "lease_token": token,
                                                                    "iterations": [{"iteration": 1, "thought": "t"}]}))
                assert beat["cancel"] is False
                locks = _json(await session.call_tool("acquire_locks", {
                    "paths": [f"notes/{pulled['step']['key']}.md"], "mode": "write", "step_id": step_id,
                    "lease_token": token}))
                assert locks["locks"][0]["fencing"] >= 1
                released = _json(await session.call_tool("release_locks", {"ids": [locks["locks"][0]["id"]]}))
                assert released["released"] == [locks["locks"][0]["id"]]
                report = _json(await session.call_tool("report_result", {
                    "step_id": step_id, "lease_token": token, "status": "completed",
                    "final_result": f"done {pulled['step']['key']}"}))
                done.append((pulled["step"]["key"], report))
            status = _json(await session.call_tool("workflow_status", {"workflow_id": str(workflow.id)}))
            resource = await session.read_resource(f"am://workflows/{workflow.id}")
            return names, prompts, done, status, json.loads(resource.contents[0].text)

        names, prompts, done, status, document = asyncio.run(_session_calls(live_am, agent.token, calls))
        assert {"pull_step", "heartbeat", "report_result", "acquire_locks", "release_locks", "workflow_status",
                "list_ready"} <= names
        assert "work_a_step" in prompts
        assert [key for key, _ in done] == ["A", "B"]
        assert done[0][1]["released"] == ["B"]
        assert status["status"] == "completed" and status["counts"]["completed"] == 2
        assert [s["status"] for s in document["steps"]] == ["completed", "completed"]
        assert Step.objects.get(workflow=workflow, key="B").final_result == "done B"

    def test_a_wrong_token_is_refused(self, live_am):
        async def calls(session):
            return await session.list_tools()

        with pytest.raises(BaseException):  # the SDK client cannot even initialize
            asyncio.run(_session_calls(live_am, "not-a-token", calls))
        response = httpx2.post(f"{live_am}/mcp", headers={"Authorization": "Bearer not-a-token"}, json={})
        assert response.status_code == 401

    def test_a_stale_lease_is_refused_through_mcp_as_through_rest(self, live_am, make_agent, step, workflow_spec):
        first = make_agent("mcp-first", ["developer"])
        second = make_agent("mcp-second", ["developer"])
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Stale"))
        lease = pull.step_pull(agent=first.agent, roles=["developer"])
        # The lease runs out, the sweep hands the step back, another agent takes it.
        Step.objects.filter(id=lease.step.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        leases.lease_expire(step_id=lease.step.id)
        assert isinstance(pull.step_pull(agent=second.agent, roles=["developer"]), pull.Lease)

        async def calls(session):
            return await session.call_tool("report_result", {"step_id": str(lease.step.id),
                                                             "lease_token": lease.token, "status": "completed",
                                                             "final_result": "stale"})

        result = asyncio.run(_session_calls(live_am, first.token, calls))
        assert result.is_error
        assert "stale_lease" in result.content[0].text and "pull_step" in result.content[0].text
        rest = first.client().post("/v1/report_result", {"step_id": str(lease.step.id), "lease_token": lease.token,
                                                         "status": "completed"}, format="json")
        assert rest.status_code == 409 and rest.json()["error"] == "stale_lease"
        assert not Result.objects.filter(step__workflow=workflow, status="completed").exists()

    def test_a_lock_conflict_names_the_holder_and_says_what_to_do(self, live_am, make_agent):
        holder = make_agent("mcp-holder", ["developer"])
        other = make_agent("mcp-other", ["developer"])
        file_locks.locks_acquire(agent=holder.agent, paths=["src/app.py"], mode="write", project_name="default")

        async def calls(session):
            return await session.call_tool("acquire_locks", {"paths": ["src/app.py"], "mode": "write",
                                                             "project": "default"})

        result = asyncio.run(_session_calls(live_am, other.token, calls))
        assert result.is_error
        text = result.content[0].text
        assert "lock_conflict: src/app.py is held (write) by mcp-holder until " in text
        assert "pick another step" in text.lower()


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _seed(project: str, path: str, content: bytes) -> None:
    """A file put there by an operator (an import), before any agent holds a lock."""
    workspace.workspace_write(project_name=project, changes=[workspace.Change(path, content)], system=True)


class MCPWorkspaceTests:
    """The workspace through MCP: the same rules and errors as `/v1/projects/{project}/files`."""

    def test_an_mcp_client_works_a_step_on_its_declared_files(self, live_am, make_agent, step, workflow_spec):
        agent = make_agent("mcp-editor", ["developer"])
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("A", files=(("src/app.py", "write"), ("old.txt", "write"))), name="Files via MCP", project="mcpweb"))
        _seed("mcpweb", "old.txt", b"obsolete\n")

        async def calls(session):
            names = {tool.name for tool in (await session.list_tools()).tools}
            prompt = await session.get_prompt("work_a_step", {"role": "developer"})
            pulled = _json(await session.call_tool("pull_step", {"role": "developer"}))
            project, step_id, token = pulled["workflow"]["project"], pulled["step"]["id"], pulled["lease"]["token"]
            fencing = {lock["path"]: lock["fencing"] for lock in pulled["lease"]["locks"]}
            written = _json(await session.call_tool("write_file", {
                "project": project, "path": "src/app.py", "content": "print('hi')\n",
                "fencing": fencing["src/app.py"], "if_none_match": True}))
            read = _json(await session.call_tool("read_file", {"project": project, "path": "src/app.py"}))
            listed = _json(await session.call_tool("list_files", {"project": project, "prefix": "src/"}))
            history = _json(await session.call_tool("file_history", {"project": project, "path": "src/app.py"}))
            old = _json(await session.call_tool("read_file", {"project": project, "path": "old.txt"}))
            deleted = _json(await session.call_tool("delete_file", {
                "project": project, "path": "old.txt", "fencing": fencing["old.txt"], "if_match": old["sha256"]}))
            report = _json(await session.call_tool("report_result", {
                "step_id": step_id, "lease_token": token, "status": "completed", "final_result": "wrote app.py"}))
            return names, prompt.messages[0].content.text, pulled, fencing, written, read, listed, history, old, \
                deleted, report

        names, prompt, pulled, fencing, written, read, listed, history, old, deleted, report = asyncio.run(
            _session_calls(live_am, agent.token, calls))
        assert {"list_files", "read_file", "write_file", "delete_file", "file_history"} <= names
        assert all(words in prompt for words in ("read_file", "lease.locks", "acquire_locks", "fencing", "sha256"))
        assert pulled["workflow"]["project"] == "mcpweb"
        assert {lock["mode"] for lock in pulled["lease"]["locks"]} == {"write"} and set(fencing) == {"src/app.py",
                                                                                                     "old.txt"}
        assert written == {"path": "src/app.py", "sha256": _sha(b"print('hi')\n"), "size": 12, "version": 2}
        assert read == {"project": "mcpweb", "path": "src/app.py", "version": 2, "sha256": written["sha256"],
                        "size": 12, "binary": False, "content": "print('hi')\n"}
        assert listed["version"] == 2 and [f["path"] for f in listed["files"]] == ["src/app.py"]
        assert listed["files"][0]["agent"] == "mcp-editor" and listed["files"][0]["step_id"] == pulled["step"]["id"]
        assert [(v["version"], v["fencing"], v["deleted"]) for v in history["versions"]] == [
            (2, fencing["src/app.py"], False)]
        assert old["content"] == "obsolete\n" and old["version"] == 1
        assert deleted == {"path": "old.txt", "sha256": "", "size": 0, "version": 3, "deleted": True}
        assert report["status"] == "completed"
        # The server holds the content, as REST reads it, and knows which step wrote it.
        project = Project.objects.get(name="mcpweb")
        assert project.workspace_version == 3
        assert workspace_reads.workspace_file(project=project, path="src/app.py").content == b"print('hi')\n"
        assert agent.client().get("/v1/projects/mcpweb/files/src/app.py").content == b"print('hi')\n"
        assert WorkspaceFile.objects.get(project=project, path="old.txt").deleted
        assert FileVersion.objects.get(project=project, path="src/app.py").step_id == Step.objects.get(
            workflow=workflow, key="A").id

    def test_a_stale_fencing_number_is_refused_through_mcp_as_through_rest(self, live_am, make_agent):
        first = make_agent("mcp-late", ["developer"])
        second = make_agent("mcp-next", ["developer"])
        projects.project_create(name="mcpstale")
        _seed("mcpstale", "src/app.py", b"v1\n")
        mine = file_locks.locks_acquire(agent=first.agent, paths=["src/app.py"], mode="write",
                                        project_name="mcpstale")[0]
        # The lock ends and another agent takes the file.
        file_locks.lock_release(lock_id=mine.id, agent=first.agent)
        theirs = file_locks.locks_acquire(agent=second.agent, paths=["src/app.py"], mode="write",
                                          project_name="mcpstale")[0]

        async def calls(session):
            stale = await session.call_tool("write_file", {"project": "mcpstale", "path": "src/app.py",
                                                           "content": "late\n", "fencing": mine.fencing})
            unlocked = await session.call_tool("write_file", {"project": "mcpstale", "path": "src/app.py",
                                                              "content": "late\n"})
            gone = await session.call_tool("delete_file", {"project": "mcpstale", "path": "src/app.py",
                                                           "fencing": mine.fencing})
            return stale, unlocked, gone

        stale, unlocked, gone = asyncio.run(_session_calls(live_am, first.token, calls))
        assert stale.is_error
        text = stale.content[0].text
        assert "stale_fencing: Fencing" in text and f'"current_fencing": {theirs.fencing}' in text
        assert "read the file again, lock it again, then write" in text
        assert unlocked.is_error and "lock_required: " in unlocked.content[0].text
        assert "acquire_locks" in unlocked.content[0].text
        assert gone.is_error and "stale_fencing: " in gone.content[0].text
        rest = first.client().generic("PUT", "/v1/projects/mcpstale/files/src/app.py", b"late\n",
                                      content_type="application/octet-stream", HTTP_X_AM_FENCING=str(mine.fencing))
        assert rest.status_code == 409 and rest.json()["error"] == "stale_fencing"
        assert rest.json()["current_fencing"] == theirs.fencing
        # Nothing was written: the seed is still the only version.
        project = Project.objects.get(name="mcpstale")
        assert project.workspace_version == 1
        assert workspace_reads.workspace_file(project=project, path="src/app.py").content == b"v1\n"

    def test_a_binary_file_reads_as_base64_and_a_bad_path_is_refused(self, live_am, make_agent):
        agent = make_agent("mcp-reader", ["developer"])
        projects.project_create(name="mcpbin")
        logo = b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"
        _seed("mcpbin", "img/logo.png", logo)
        _seed("mcpbin", "latin1.txt", "café".encode("latin-1"))

        async def calls(session):
            binary = _json(await session.call_tool("read_file", {"project": "mcpbin", "path": "img/logo.png"}))
            latin = _json(await session.call_tool("read_file", {"project": "mcpbin", "path": "./latin1.txt"}))
            refused = [await session.call_tool(tool, {"project": "mcpbin", "path": path, **extra})
                       for tool, path, extra in (("read_file", "../etc/passwd", {}), ("read_file", "img/", {}),
                                                 ("file_history", "/etc/passwd", {}),
                                                 ("write_file", "a/../../x", {"content": "x", "fencing": 1}))]
            missing = await session.call_tool("read_file", {"project": "mcpbin", "path": "nope.txt"})
            return binary, latin, refused, missing

        binary, latin, refused, missing = asyncio.run(_session_calls(live_am, agent.token, calls))
        assert binary["binary"] is True and "content" not in binary
        assert base64.b64decode(binary["content_b64"]) == logo
        assert binary["sha256"] == _sha(logo) and binary["size"] == len(logo) and binary["version"] == 1
        assert latin["binary"] is True and latin["path"] == "latin1.txt"
        assert base64.b64decode(latin["content_b64"]) == "café".encode("latin-1")
        for result in refused:
            assert result.is_error and "invalid_path: " in result.content[0].text, result.content[0].text
            assert "relative to the workspace" in result.content[0].text
        assert agent.client().get("/v1/projects/mcpbin/files/img/").status_code == 400
        assert missing.is_error and "not_found: No file nope.txt" in missing.content[0].text
        assert Project.objects.get(name="mcpbin").workspace_version == 2


class MCPProtocolTests:
    """One worker protocol: MCP refuses and lists exactly as the REST pull does, with the same HTTP guarantees."""

    def test_list_ready_refuses_a_role_the_agent_does_not_hold(self, live_am, make_agent):
        agent = make_agent("mcp-lister", ["developer"])

        async def calls(session):
            return [await session.call_tool("list_ready", {"role": role}) for role in ("tester", "Bad Role", "human")]

        not_held, malformed, human = asyncio.run(_session_calls(live_am, agent.token, calls))
        assert not_held.is_error and "forbidden: Agent 'mcp-lister' does not hold role(s) tester" in not_held.content[0].text
        assert malformed.is_error and "invalid_request" in malformed.content[0].text
        assert human.is_error and "forbidden" in human.content[0].text
        # The REST pull answers the same three the same way.
        assert agent.client().get("/v1/tasks/tester/ready").status_code == 403
        assert agent.client().get("/v1/tasks/Bad Role/ready").status_code == 400
        assert agent.client().get("/v1/tasks/human/ready").status_code == 403

    def test_list_ready_lists_only_what_a_pull_could_hand_out_now(self, live_am, make_agent, step, workflow_spec):
        agent = make_agent("mcp-looker", ["developer"], capacity=2)
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("now"), step("later"), name="Backoff"))
        # "later" waits out a retry backoff, as after a failed attempt.
        Step.objects.filter(workflow=workflow, key="later").update(
            available_at=timezone.now() + timedelta(minutes=5))

        async def calls(session):
            listed = _json(await session.call_tool("list_ready", {"role": "developer"}))
            pulled = _json(await session.call_tool("pull_step", {"role": "developer"}))
            again = _json(await session.call_tool("pull_step", {"role": "developer"}))
            return listed, pulled, again

        listed, pulled, again = asyncio.run(_session_calls(live_am, agent.token, calls))
        assert [s["key"] for s in listed["steps"]] == ["now"]
        assert pulled["step"]["key"] == "now"
        assert again["step"] is None, "the step waiting out its backoff is not handed out either"

    def test_mcp_answers_carry_server_timing_and_refuse_a_body_over_the_limit(self, live_am, settings, make_agent):
        agent = make_agent("mcp-timed", ["developer"])
        headers = {"Authorization": f"Bearer {agent.token}", "Accept": "application/json, text/event-stream"}
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        ok = httpx2.post(f"{live_am}/mcp", headers=headers, json=hello)
        assert ok.status_code == 200, ok.text
        assert ok.headers["server-timing"].startswith("app;dur=")
        refused = httpx2.post(f"{live_am}/mcp", headers={"Authorization": "Bearer wrong"}, json=hello)
        assert refused.status_code == 401 and "server-timing" in refused.headers
        too_big = httpx2.post(f"{live_am}/mcp", headers=headers,
                              content=b'{"pad": "' + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'"}')
        assert too_big.status_code == 413
        assert too_big.json()["error"] == "too_large"
