"""An offline, deterministic stand-in for an LLM, for demos and tests.

It answers the same JSON the real providers must give, from the context block
the prompts embed (```am-context ...```), so a worker using it still goes
through the real API, leases, locks and tools: it looks at the workspace, reads
its declared inputs, writes plausible files for its role, then finishes.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from agents.llm.base import Usage

_CONTEXT = re.compile(r"```am-context\s*(\{.*?\})\s*```", re.S)
CANONICAL_ORDER = ["researcher", "analyst", "architect", "developer", "tester", "writer", "reviewer"]


def context_of(messages: list[dict[str, str]]) -> dict[str, Any]:
    for message in messages:
        match = _CONTEXT.search(message.get("content", ""))
        if match:
            return json.loads(match.group(1))
    return {}


def _usage(messages: list[dict[str, str]], reply: dict[str, Any]) -> Usage:
    prompt = sum(len(m.get("content", "")) for m in messages) // 4
    return Usage(model="scripted", prompt_tokens=prompt, completion_tokens=len(json.dumps(reply)) // 4)


def _content_for(role: str, path: str, context: dict[str, Any]) -> str:
    name = context.get("name", "the step")
    inputs = context.get("inputs", {})
    sources = ", ".join(sorted(k for k in inputs if not k.startswith("_"))) or "the goal"
    feedback = inputs.get("_audit", {}).get("feedback") if isinstance(inputs.get("_audit"), dict) else None
    revised = f"\n\nRevised after audit feedback: {feedback}\n" if feedback else ""
    if path.endswith(".py") and (role == "tester" or "test" in path.rsplit("/", 1)[-1]):
        return _test_module(name, context, feedback)
    if path.endswith(".py"):
        return (f'"""{name}: a small, working prototype."""\n\n\nclass NoteBook:\n'
                "    def __init__(self):\n        self.notes = []\n\n"
                "    def add(self, text: str) -> None:\n        self.notes.append(text.strip())\n\n"
                "    def search(self, word: str) -> list[str]:\n"
                "        return [note for note in self.notes if word.lower() in note.lower()]\n")
    headings = {
        "researcher": ["Questions", "Findings", "Open issues"],
        "analyst": ["Market", "Competitors", "Numbers"],
        "architect": ["Context", "Components", "Decisions"],
        "writer": ["Summary", "How to use it", "What comes next"],
        "reviewer": ["What works", "What to improve"],
    }.get(role, ["Overview", "Details"])
    body = "\n\n".join(f"## {h}\n\n- {name}: {h.lower()} drawn from {sources}." for h in headings)
    return f"# {name}\n\n{body}\n{revised}"


def _test_module(name: str, context: dict[str, Any], feedback: str | None) -> str:
    """Tests that run under pytest, or alone (`python tests/test_x.py`), writing a report under reports/."""
    sources = [f["path"] for f in context.get("files", [])
               if f.get("mode") == "read" and (f["path"].endswith(".py") or f["path"].endswith("/"))]
    revised = f"# Revised after audit feedback: {feedback}\n" if feedback else ""
    return f'''"""Tests written for: {name}."""
{revised}
import importlib.util
import pathlib
import sys

SOURCES = {sources!r}  # the code under test, relative to the workspace


def _modules():
    for source in SOURCES:
        base = pathlib.Path(source)
        for path in sorted([base] if base.suffix == ".py" else base.glob("*.py")):
            if path.is_file():
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                yield module


def test_prototype_behaves():
    notes = []
    notes.append("first note")
    assert notes == ["first note"]


def test_the_code_under_test():
    for module in _modules():
        if hasattr(module, "NoteBook"):
            book = module.NoteBook()
            book.add(" Buy milk ")
            assert book.search("MILK") == ["Buy milk"]


if __name__ == "__main__":
    tests = [test for key, test in sorted(globals().items()) if key.startswith("test_")]
    failed = []
    for test in tests:
        try:
            test()
        except Exception as exc:
            failed.append(f"FAILED {{test.__name__}}: {{exc!r}}\\n")
    report = pathlib.Path("reports") / (pathlib.Path(__file__).stem + ".txt")
    report.parent.mkdir(exist_ok=True)
    report.write_text(f"{{len(tests) - len(failed)}} passed, {{len(failed)}} failed\\n" + "".join(failed))
    print(report.read_text(), end="")
    sys.exit(1 if failed else 0)
'''


def _edited(previous: str, role: str, path: str, context: dict[str, Any]) -> str:
    if previous.startswith("Refused:"):
        return _content_for(role, path, context)
    note = f"Edited by the {role} for: {context.get('name', 'the step')}."
    return f"{previous.rstrip()}\n\n{'# ' if path.endswith('.py') else ''}{note}\n"


def _observations(messages: list[dict[str, str]]) -> list[str]:
    """What each action so far showed, in order."""
    return [m["content"].removeprefix("Observation:\n") for m in messages
            if m.get("role") == "user" and m.get("content", "").startswith("Observation:\n")]


def _commands_offered(messages: list[dict[str, str]]) -> bool:
    return any(m.get("role") == "system" and "run_command(" in m.get("content", "") for m in messages)


def _last_exit(messages: list[dict[str, str]]) -> str:
    for message in reversed(messages):
        content = message.get("content", "")
        if message.get("role") == "user" and content.startswith("Observation:\n$ "):
            lines = content.splitlines()
            return f"; ran {lines[1][2:]}: {lines[2] if len(lines) > 2 else ''}"
    return ""


def _act(messages: list[dict[str, str]], context: dict[str, Any]) -> dict[str, Any]:
    role = context.get("role", "worker")
    files = context.get("files", [])
    reads = [f["path"] for f in files if f.get("mode") == "read" and not f["path"].endswith("/")]
    writes = [f["path"] for f in files if f.get("mode") == "write" and not f["path"].endswith("/")]
    if not writes:
        writes = [f"notes/{context.get('key', 'step')}.md"]
    plan: list[dict[str, Any]] = [
        {"thought": "First, see what the workspace holds.", "action": {"tool": "list_files", "args": {"path": "."}}},
    ]
    listing = _observations(messages)[:1]
    present = set(listing[0].splitlines()) if listing else set()
    # A file to write that another step wrote already is read first, then edited rather than replaced.
    edits = [path for path in writes if path in present and path not in reads]
    plan += [{"thought": f"Read {path}, which this step needs.",
              "action": {"tool": "read_file", "args": {"path": path}}} for path in reads + edits]
    read_back = dict(zip(reads + edits, _observations(messages)[1:]))
    plan += [{"thought": f"{'Edit' if path in edits else 'Write'} {path} for the {role} part of the work.",
              "action": {"tool": "write_file", "args": {"path": path, "content": (
                  _edited(read_back.get(path, ""), role, path, context) if path in edits
                  else _content_for(role, path, context))}}}
             for path in writes]
    tests = [path for path in writes if path.endswith(".py") and "test" in path.rsplit("/", 1)[-1]]
    if tests and _commands_offered(messages):
        plan.append({"thought": f"Run {tests[0]} to see that the tests pass; its report is saved with it.",
                     "action": {"tool": "run_command", "args": {"command": f"python {tests[0]}"}}})
    summary = (f"{context.get('name', 'Step')}: done by the {role}; wrote {', '.join(writes)}"
               f"{_last_exit(messages)}.")
    plan.append({"thought": "The work is written; finish with a summary.",
                 "action": {"tool": "finish", "args": {"result": summary, "outputs": {"files": writes}}}})
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    return plan[min(turn, len(plan) - 1)]


def _plan(context: dict[str, Any]) -> dict[str, Any]:
    goal = context.get("goal", "the goal")
    roles = [r for r in CANONICAL_ORDER if r in context.get("roles", [])] or sorted(context.get("roles", []))[:1]
    steps: list[dict[str, Any]] = []
    first_wave = [r for r in roles if r in ("researcher", "analyst")]
    for role in first_wave:
        steps.append({"key": f"{role}_findings", "name": f"{role.title()} findings", "role": role,
                      "description": f"Gather what the team needs to know for: {goal}", "depends_on": [],
                      "files": [{"path": f"research/{role}.md", "mode": "write"}]})
    previous = [s["key"] for s in steps]
    for role in [r for r in roles if r not in first_wave]:
        key = {"architect": "design", "developer": "build", "tester": "test", "writer": "report",
               "reviewer": "review"}.get(role, role)
        path = {"architect": "design/architecture.md", "developer": "src/prototype.py",
                "tester": "tests/test_prototype.py", "writer": "report.md",
                "reviewer": "review.md"}.get(role, f"{role}/output.md")
        steps.append({"key": key, "name": f"{key.title()} for the goal", "role": role,
                      "description": f"As the {role}, do your part of: {goal}", "depends_on": previous,
                      "files": [{"path": path, "mode": "write"}]})
        previous = [key]
    return {"steps": steps}


def _audit(context: dict[str, Any]) -> dict[str, Any]:
    weak = [s["key"] for s in context.get("steps", [])
            if not s.get("final_result", "").strip() or "TODO" in s.get("final_result", "")]
    return {
        "successful": not weak,
        "feedback": "Every step gave a complete result." if not weak
        else f"Steps {', '.join(weak)} left work unfinished (empty or TODO).",
        "rework_suggestions": [{"step": key, "reason": "The result is empty or marked TODO."} for key in weak],
        "confidence": 0.7,
        "criteria": ["every step has a complete result", "no TODO left"],
    }


def _synthesis(context: dict[str, Any]) -> dict[str, Any]:
    parts = [f"{s['name']}: {s.get('final_result', '').strip()}" for s in context.get("steps", [])]
    return {"synthesis": f"{context.get('goal') or context.get('name', 'The workflow')}\n\n" + "\n".join(parts)}


class ScriptedProvider:
    """`AM_SCRIPTED_DELAY_S` makes each answer take that long, so demos show work in flight."""

    name = "scripted"

    def __init__(self, delay_s: float | None = None) -> None:
        self.delay_s = float(os.environ.get("AM_SCRIPTED_DELAY_S", "0") or 0) if delay_s is None else delay_s

    def complete_json(self, messages: list[dict[str, str]], schema: dict[str, Any], *, purpose: str
                      ) -> tuple[dict[str, Any], Usage]:
        if self.delay_s > 0 and purpose == "act":
            time.sleep(self.delay_s)
        context = context_of(messages)
        reply = {"act": lambda: _act(messages, context), "plan": lambda: _plan(context),
                 "audit": lambda: _audit(context), "synthesis": lambda: _synthesis(context)}[purpose]()
        return reply, _usage(messages, reply)
