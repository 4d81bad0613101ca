"""The auditor: an LLM judges a finished workflow and may send weak steps back; and the synthesis."""

from __future__ import annotations

import json
from typing import Any

from agents.llm.base import LLM, Usage

AUDIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["successful", "feedback", "rework_suggestions", "confidence"],
    "properties": {
        "successful": {"type": "boolean"},
        "feedback": {"type": "string"},
        "rework_suggestions": {
            "type": "array",
            "items": {"type": "object", "required": ["step", "reason"],
                      "properties": {"step": {"type": "string"}, "reason": {"type": "string"}}},
        },
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "criteria": {"type": "array", "items": {"type": "string"}},
    },
}

SYNTHESIS_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["synthesis"], "properties": {"synthesis": {"type": "string"}},
}

MAX_RESULT_CHARS = 4000


def _steps_context(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**step, "final_result": (step.get("final_result") or "")[:MAX_RESULT_CHARS]} for step in steps]


def review(llm: LLM, *, goal: str, name: str, steps: list[dict[str, Any]], checks: list[dict[str, Any]]
           ) -> tuple[dict[str, Any], Usage]:
    context = {"goal": goal, "name": name, "steps": _steps_context(steps), "checks": checks}
    messages = [
        {"role": "system", "content": (
            "You audit the work of a team of agents. Judge whether the steps' results together meet the goal. "
            "Name the steps to redo (by key) with the reason, only where redoing them would fix a real gap. "
            "Give your confidence from 0 to 1 and the criteria you judged by.")},
        {"role": "user", "content": f"```am-context\n{json.dumps(context)}\n```"},
    ]
    return llm.complete_json(messages, AUDIT_SCHEMA, purpose="audit")


def synthesize(llm: LLM, *, goal: str, name: str, steps: list[dict[str, Any]]) -> tuple[str, Usage]:
    context = {"goal": goal, "name": name, "steps": _steps_context(steps)}
    messages = [
        {"role": "system", "content": "Write the final answer of the workflow for the person who asked: "
                                      "what was done and what came out of it, from the steps' results."},
        {"role": "user", "content": f"```am-context\n{json.dumps(context)}\n```"},
    ]
    reply, usage = llm.complete_json(messages, SYNTHESIS_SCHEMA, purpose="synthesis")
    return reply["synthesis"], usage


def concatenate(*, goal: str, name: str, steps: list[dict[str, Any]]) -> str:
    """The synthesis without an LLM: every step's result, in order."""
    header = goal.strip() or name
    return header + "\n\n" + "\n\n".join(f"## {s['key']}: {s['name']}\n\n{(s.get('final_result') or '').strip()}"
                                        for s in steps)
