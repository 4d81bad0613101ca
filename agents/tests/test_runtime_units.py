"""The worker's parts in isolation: tools, the Reason+Act loop, configuration."""

import argparse
import os
import sys
import time

import pytest

from agents.cli import ConfigError, parser, resolve
from agents.llm.base import LLMError, Usage
from agents.react import run_loop
from agents.tools import CommandPolicy, ToolError, Workspace, run_process

STEP = {"key": "A", "name": "Do A", "role": "developer", "description": "", "files": [], "inputs": {}}


class ScriptLLM:
    """Answers from a list; an exception in the list is raised instead."""

    name = "script"

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0
        self.prompts = []
        self.schemas = []

    def complete_json(self, messages, schema, *, purpose):
        self.calls += 1
        self.prompts.append(messages[0]["content"])
        self.schemas.append(schema)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer, Usage(model="script", prompt_tokens=3, completion_tokens=2)


def _loop(tmp_path, llm, **extra):
    history = []
    outcome = run_loop(llm=llm, step=STEP, workflow={"name": "W"}, workspace=Workspace(tmp_path),
                       on_iteration=history.append, should_stop=lambda: False, llm_retries=2, **extra)
    return outcome, history


class WorkspaceTests:
    @pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "", "C:/x", 5])
    def test_it_refuses_paths_outside(self, tmp_path, path):
        with pytest.raises(ToolError):
            Workspace(tmp_path / "ws").relative(path)

    def test_it_refuses_a_link_that_leads_out(self, tmp_path):
        workspace = Workspace(tmp_path / "ws")
        (tmp_path / "ws" / "escape").symlink_to(tmp_path)
        with pytest.raises(ToolError, match="link"):
            workspace.read_file("escape/secret")

    def test_it_locks_an_undeclared_file_before_writing_it(self, tmp_path):
        locked = []

        def lock(paths):
            locked.extend(paths)
            return [{"path": path, "mode": "write", "fencing": 9} for path in paths]
        workspace = Workspace(tmp_path, locks=[{"path": "src/", "mode": "write", "fencing": 4},
                                               {"path": "docs/", "mode": "read", "fencing": 2}], lock_writer=lock)
        workspace.write_file("src/app.py", "x = 1\n")
        workspace.write_file("notes/todo.md", "- a\n")
        workspace.write_file("notes/todo.md", "- b\n")
        workspace.write_file("docs/x.md", "a read lock is not a write lock\n")
        assert locked == ["notes/todo.md", "docs/x.md"]
        assert (tmp_path / "notes/todo.md").read_text() == "- b\n"
        assert workspace.written == ["src/app.py", "notes/todo.md", "docs/x.md"]

    def test_a_refused_lock_is_not_a_write(self, tmp_path):
        def refuse(paths):
            raise ToolError(f"lock_conflict on {paths}")
        workspace = Workspace(tmp_path, lock_writer=refuse)
        with pytest.raises(ToolError):
            workspace.write_file("shared.md", "x")
        assert not (tmp_path / "shared.md").exists()


    def test_the_mirror_bookkeeping_is_not_a_project_file(self, tmp_path):
        with pytest.raises(ToolError, match="bookkeeping"):
            Workspace(tmp_path).read_file(".am-mirror/state.json")


class CommandTests:
    def test_run_command_is_offered_only_when_commands_are_allowed(self, tmp_path):
        assert "run_command" not in Workspace(tmp_path).tool_docs()
        assert "run_command" in Workspace(tmp_path, commands=CommandPolicy()).tool_docs()
        llm = ScriptLLM([
            {"thought": "try", "action": {"tool": "run_command", "args": {"command": "touch x"}}},
            {"thought": "ok", "action": {"tool": "finish", "args": {"result": "done"}}},
        ])
        outcome, history = _loop(tmp_path, llm)
        assert "run_command" not in llm.prompts[0] and "write_file(" in llm.prompts[0]
        assert "run_command" not in llm.schemas[0]["properties"]["action"]["properties"]["tool"]["enum"]
        assert history[0]["observation"].startswith("Refused: run_command is not offered")
        assert "--allow-commands" in history[0]["observation"] and not (tmp_path / "x").exists()

    def test_a_command_gets_no_secrets_and_the_workers_python(self, tmp_path, monkeypatch):
        monkeypatch.setenv("AM_TOKEN", "tok-3f9a")
        monkeypatch.setenv("AM_LLM_API_KEY", "key-77c1")
        monkeypatch.setenv("OPENAI_API_KEY", "key-0b2e")
        ran = run_process("env; python -c 'import sys; print(sys.executable)'", cwd=tmp_path, timeout_s=30)
        assert "exit code 0" in ran and "PATH=" in ran
        assert not any(secret in ran for secret in ("tok-3f9a", "key-77c1", "key-0b2e"))
        assert not any(line.startswith("AM_") for line in ran.splitlines())
        assert os.path.realpath(sys.executable) in [os.path.realpath(line) for line in ran.splitlines()]

    def test_a_command_is_stopped_at_its_timeout_and_its_output_cut(self, tmp_path):
        started = time.monotonic()
        ran = run_process("yes line | head -c 100000; sleep 30", cwd=tmp_path, timeout_s=1)
        assert time.monotonic() - started < 10
        assert "timed out after 1 s" in ran and "bytes left out" in ran and len(ran) < 4000


class LoopTests:
    def test_a_path_outside_is_told_to_the_llm_as_an_observation(self, tmp_path):
        llm = ScriptLLM([
            {"thought": "peek", "action": {"tool": "read_file", "args": {"path": "/etc/passwd"}}},
            {"thought": "ok", "action": {"tool": "finish", "args": {"result": "done"}}},
        ])
        outcome, history = _loop(tmp_path, llm)
        assert outcome.status == "completed" and outcome.final_result == "done"
        assert history[0]["observation"].startswith("Refused:") and "outside the workspace" in history[0]["observation"]

    def test_an_llm_error_is_retried_then_reported_failed_retryable(self, tmp_path, monkeypatch):
        monkeypatch.setattr("agents.react.time.sleep", lambda s: None)
        llm = ScriptLLM([LLMError("503", retryable=True), LLMError("503", retryable=True)])
        outcome, _ = _loop(tmp_path, llm)
        assert (outcome.status, outcome.retryable) == ("failed", True)
        assert llm.calls == 2

    def test_a_permanent_llm_error_fails_at_once_not_retryable(self, tmp_path):
        llm = ScriptLLM([LLMError("401 bad key", retryable=False)])
        outcome, _ = _loop(tmp_path, llm)
        assert (outcome.status, outcome.retryable, llm.calls) == ("failed", False, 1)

    def test_a_loop_that_never_finishes_fails(self, tmp_path):
        llm = ScriptLLM([{"thought": "look", "action": {"tool": "list_files", "args": {}}}] * 3)
        outcome, history = _loop(tmp_path, llm, max_iterations=3)
        assert outcome.status == "failed" and "3 iterations" in outcome.error and len(history) == 3

    def test_usage_is_summed(self, tmp_path):
        usage = Usage()
        llm = ScriptLLM([{"thought": "a", "action": {"tool": "list_files", "args": {}}},
                         {"thought": "b", "action": {"tool": "finish", "args": {"result": "r"}}}])
        _loop(tmp_path, llm, usage=usage)
        assert (usage.prompt_tokens, usage.completion_tokens) == (6, 4)


class ConfigTests:
    def test_the_command_line_beats_the_environment_which_beats_the_file(self, tmp_path):
        config = tmp_path / "w.toml"
        config.write_text('server = "http://file"\ntoken = "file-token"\nroles = ["a", "b"]\nworkspace = "/tmp/f"\n'
                          'concurrency = 3\n[llm]\nprovider = "openai"\nmodel = "file-model"\n')
        args = parser().parse_args(["--config", str(config), "--server", "http://cli"])
        resolved, llm, options = resolve(args, {"AM_TOKEN": "env-token", "AM_LLM_MODEL": "env-model"})
        assert resolved.server == "http://cli" and resolved.token == "env-token"
        assert resolved.roles == ["a", "b"] and resolved.concurrency == 3
        assert llm == "openai" and options["model"] == "env-model"

    def test_commands_are_off_unless_allowed(self):
        base = ["--server", "http://x", "--token", "t", "--workspace", "/tmp/w"]
        assert resolve(parser().parse_args(base), {})[0].allow_commands is False
        allowed, _, _ = resolve(parser().parse_args([*base, "--allow-commands", "--command-timeout", "30"]), {})
        assert (allowed.allow_commands, allowed.command_timeout_s) == (True, 30.0)
        assert resolve(parser().parse_args(base), {"AM_ALLOW_COMMANDS": "1"})[0].allow_commands is True

    def test_missing_settings_are_named(self):
        with pytest.raises(ConfigError, match="--token, --workspace"):
            resolve(parser().parse_args(["--server", "http://x"]), {})

    def test_a_bad_config_file_is_named(self, tmp_path):
        bad = tmp_path / "bad.toml"
        bad.write_text("server = ")
        with pytest.raises(ConfigError, match="bad.toml"):
            resolve(argparse.Namespace(**{**vars(parser().parse_args([])), "config": str(bad)}), dict(os.environ))
