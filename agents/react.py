"""The Reason+Act loop: the LLM thinks, picks a tool, sees the observation, until it finishes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.llm.base import LLM, LLMError, Usage
from agents.tools import TOOL_DOCS, LeaseLost, ToolError, Workspace

logger = logging.getLogger("agents.react")


def action_schema(tools: list[str]) -> dict[str, Any]:
    """The JSON an LLM answers with: a thought and one of the `tools` offered."""
    return {
        "type": "object",
        "required": ["thought", "action"],
        "properties": {
            "thought": {"type": "string"},
            "action": {
                "type": "object",
                "required": ["tool"],
                "properties": {
                    "tool": {"type": "string", "enum": tools},
                    "args": {"type": "object"},
                },
            },
        },
    }


ACTION_SCHEMA = action_schema(list(TOOL_DOCS))

MAX_OBSERVATION = 4000


class Stopped(Exception):
    """The loop was asked to stop (cancel, lease lost, shutdown)."""


@dataclass
class Outcome:
    status: str  # completed | failed
    final_result: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    retryable: bool = False


def system_prompt(role: str, tool_docs: dict[str, str] | None = None) -> str:
    tools = "\n".join(f"- {doc}" for doc in (tool_docs or TOOL_DOCS).values())
    return (
        f"You are the {role} of a team of agents working in one shared workspace (other agents, maybe on "
        "other machines, see what you write once the server takes it). Work on the step you are "
        "given, one action at a time. Each reply is a JSON object: {\"thought\": what you think next, "
        "\"action\": {\"tool\": name, \"args\": {...}}}. You will be shown the observation of each action.\n"
        f"Tools:\n{tools}\n"
        "Stay inside the workspace, write the files the step asks for, and call finish with a result the "
        "next steps can build on."
    )


def task_prompt(step: dict[str, Any], workflow: dict[str, Any]) -> str:
    context = {
        "workflow": workflow.get("name", ""),
        "key": step["key"],
        "name": step["name"],
        "role": step["role"],
        "description": step.get("description", ""),
        "files": step.get("files", []),
        "inputs": step.get("inputs", {}),
        "attempt": step.get("attempt", 1),
    }
    return (
        f"Step {step['key']}: {step['name']}\n\n{step.get('description', '')}\n\n"
        "Everything about the step (declared files, results of the steps before it):\n"
        f"```am-context\n{json.dumps(context, indent=1)}\n```"
    )


def run_loop(
    *, llm: LLM, step: dict[str, Any], workflow: dict[str, Any], workspace: Workspace,
    on_iteration: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool],
    max_iterations: int = 25, llm_retries: int = 3, usage: Usage | None = None,
) -> Outcome:
    """Run the loop to an outcome; raise Stopped or LeaseLost when told to drop the work."""
    usage = usage if usage is not None else Usage()
    tool_docs = workspace.tool_docs()
    schema = action_schema(list(tool_docs))
    messages = [
        {"role": "system", "content": system_prompt(step["role"], tool_docs)},
        {"role": "user", "content": task_prompt(step, workflow)},
    ]
    for index in range(1, max_iterations + 1):
        if should_stop():
            raise Stopped()
        reply = None
        for attempt in range(1, llm_retries + 1):
            try:
                reply, spent = llm.complete_json(messages, schema, purpose="act")
                usage.add(spent)
                break
            except LLMError as exc:
                logger.warning("LLM error on %s (try %d of %d): %s", step["key"], attempt, llm_retries, exc)
                if not exc.retryable or attempt == llm_retries:
                    return Outcome(status="failed", error=f"LLM error: {exc}", retryable=exc.retryable)
                time.sleep(min(2 ** attempt, 10))
        thought = str(reply.get("thought", ""))
        action = reply["action"]
        tool = action["tool"]
        args = action.get("args") or {}
        action_text = json.dumps({"tool": tool, "args": _short_args(args)}, ensure_ascii=False)
        if tool == "finish":
            result = args.get("result")
            outputs = args.get("outputs") if isinstance(args.get("outputs"), dict) else {}
            on_iteration({"iteration": index, "thought": thought, "action": action_text, "observation": ""})
            return Outcome(status="completed", final_result=str(result if result is not None else ""),
                           outputs={**outputs, "files_written": list(workspace.written)})
        try:
            observation = workspace.run(tool, args)
        except ToolError as exc:
            observation = f"Refused: {exc}"
        observation = observation[:MAX_OBSERVATION]
        on_iteration({"iteration": index, "thought": thought, "action": action_text, "observation": observation})
        messages += [
            {"role": "assistant", "content": json.dumps(reply, ensure_ascii=False)},
            {"role": "user", "content": f"Observation:\n{observation}"},
        ]
    return Outcome(status="failed", error=f"The step did not finish within {max_iterations} iterations.",
                   retryable=False)


def _short_args(args: dict[str, Any]) -> dict[str, Any]:
    """Tool arguments as shown in the history: long contents cut, so the log stays readable."""
    return {key: (value[:200] + f"... ({len(value)} chars)" if isinstance(value, str) and len(value) > 240 else value)
            for key, value in args.items()}


__all__ = ["ACTION_SCHEMA", "LeaseLost", "Outcome", "Stopped", "action_schema", "run_loop"]
