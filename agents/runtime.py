"""AM's own agent: a Reason+Act handler for the worker SDK (agents/worker.py).

The SDK pulls the step, keeps its lease, streams the iterations, reports, and
stops on cancel, lease loss or shutdown; this module is only what the agent
does with a step:
1. The project's mirror under `--workspace` is brought up to date (a mirror that
   cannot be synced hands the step back).
2. The Reason+Act loop (agents/react.py) acts through the tools on it
   (agents/tools.py). A write goes to the server under a write lock's fencing
   number (a file the step did not declare is first locked under the lease),
   then to the mirror; a lock conflict is told to the LLM.
3. The loop's end is the handler's answer: a `Result`, or `Retryable`/`Failed`
   with the loop's error; the tokens it spent are counted on the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.client import ApiError, Client, Unreachable
from agents.errors import Cancelled, Failed, HandBack, LeaseLost, Retryable
from agents.llm.base import LLM
from agents.react import Stopped, run_loop
from agents.tools import CommandPolicy, ToolError, Workspace
from agents.worker import Result, Step, Worker

logger = logging.getLogger("agents")


@dataclass
class WorkerConfig:
    server: str
    token: str
    roles: list[str]
    workspace: Path
    concurrency: int = 1
    poll_wait_s: float = 10.0
    max_iterations: int = 25
    shutdown_grace_s: float = 30.0
    verbose: bool = False
    name: str = ""
    # run_command is offered only when the operator allows it (--allow-commands).
    allow_commands: bool = False
    command_timeout_s: float = 120.0
    # How long a lock for a write waits for another holder to let go before the LLM is told of the conflict.
    lock_wait_s: float = 10.0


def tool_locker(step: Step, *, wait_s: float) -> Callable[[list[str]], list[dict[str, Any]]]:
    """Takes write locks for the tools under the step's lease, all or none: the granted locks (with
    fencing). A conflict, or no server, is a ToolError the LLM is told; a stale lease is LeaseLost."""
    def lock(paths: list[str]) -> list[dict[str, Any]]:
        named = ", ".join(paths)
        try:
            return step.lock(*paths, mode="write", wait_s=wait_s).granted
        except ApiError as exc:
            if exc.code == "lock_conflict":
                raise ToolError(f"lock_conflict on {named}: {exc.detail}") from exc
            raise ToolError(f"Could not lock {named}: {exc.detail}") from exc
        except Unreachable as exc:
            raise ToolError(f"Could not lock {named}: the server is unreachable ({exc}); try again later.") from exc
    return lock


def step_tools(step: Step, config: WorkerConfig) -> Workspace:
    """The tools on the step's synced mirror, holding the locks that came with the lease."""
    mirror = step.mirror
    return Workspace(mirror.root, mirror=mirror, locks=step.lease.lease.get("locks", []),
                     lock_writer=tool_locker(step, wait_s=config.lock_wait_s),
                     commands=CommandPolicy(config.command_timeout_s) if config.allow_commands else None)


class ReactAgent:
    """The step handler of `python -m agents`: an LLM working the step through the workspace tools."""

    def __init__(self, llm: LLM, config: WorkerConfig) -> None:
        self.llm = llm
        self.config = config

    def __call__(self, step: Step) -> Result:
        try:
            tools = step_tools(step, self.config)
        except (ApiError, Unreachable, OSError) as exc:
            raise HandBack(f"the mirror could not be brought up to date ({exc})") from exc
        try:
            outcome = run_loop(
                llm=self.llm, step=step.data, workflow=step.workflow, workspace=tools,
                on_iteration=lambda iteration: step.log(**iteration), should_stop=lambda: step.cancelled,
                max_iterations=self.config.max_iterations, usage=step.usage,
            )
        except (Stopped, Cancelled, LeaseLost):
            raise
        except Exception as exc:  # a bug in a tool fails the attempt, not the worker; another may succeed
            logger.exception("Unexpected error in %s", step.label)
            raise Retryable(f"Worker error: {type(exc).__name__}: {exc}") from exc
        if outcome.status != "completed":
            raise (Retryable if outcome.retryable else Failed)(outcome.error)
        return Result(final_result=outcome.final_result, outputs=outcome.outputs)


def build_worker(config: WorkerConfig, llm: LLM, client: Client | None = None) -> Worker:
    """An SDK worker whose handler for `config.roles` (none: every role of the agent) is the ReAct agent."""
    worker = Worker(config.server, config.token, workspace=config.workspace, name=config.name,
                    poll_wait_s=config.poll_wait_s, shutdown_grace_s=config.shutdown_grace_s,
                    lock_wait_s=config.lock_wait_s, verbose=config.verbose, client=client)
    worker.register(ReactAgent(llm, config), *config.roles)
    return worker
