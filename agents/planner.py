"""The planner: an LLM turns a goal into a graph of steps for the roles the team has."""

from __future__ import annotations

import json
from typing import Any

from agents.llm.base import LLM, Usage

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["steps"],
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["key", "name", "role"],
                "properties": {
                    "key": {"type": "string"},
                    "name": {"type": "string"},
                    "role": {"type": "string"},
                    "description": {"type": "string"},
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                    "files": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["path"],
                            "properties": {"path": {"type": "string"}, "mode": {"enum": ["read", "write"]}},
                        },
                    },
                },
            },
        }
    },
}

SYSTEM = (
    "You plan work for a team of LLM agents sharing one workspace. Break the goal into a small graph of "
    "steps (usually 3 to 12). Each step has a short unique key (letters, digits, '_'), a name, one of the "
    "team's roles, a description complete enough to act on alone, the keys it depends on, and the files it "
    "writes (mode 'write') or needs (mode 'read'). Steps that can run in parallel should not depend on each "
    "other; two steps should not write the same file unless one depends on the other. No cycles."
)


def plan(llm: LLM, *, goal: str, roles: list[str], name: str = "",
         previous: dict[str, Any] | None = None, problems: list[dict[str, Any]] | None = None
         ) -> tuple[dict[str, Any], Usage]:
    context = {"goal": goal, "roles": roles, "workflow": name}
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Goal: {goal}\nThe team's roles: {', '.join(roles)}\n"
                                    f"```am-context\n{json.dumps(context)}\n```"},
    ]
    if previous is not None:
        messages += [
            {"role": "assistant", "content": json.dumps(previous)},
            {"role": "user", "content": "That plan was refused:\n"
                                        + "\n".join(f"- {p['detail']}" for p in problems or [])
                                        + "\nGive a corrected plan."},
        ]
    return llm.complete_json(messages, PLAN_SCHEMA, purpose="plan")
