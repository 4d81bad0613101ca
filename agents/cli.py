"""`am-worker` (or `python -m agents`): run a worker against an AgentManager server.

Settings come from the command line, then environment variables, then an
optional TOML file (`--config`), then defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from agents import telemetry
from agents.llm import make_llm
from agents.runtime import WorkerConfig, build_worker

ENV = {
    "server": "AM_SERVER", "token": "AM_TOKEN", "roles": "AM_ROLES", "workspace": "AM_WORKSPACE",
    "llm": "AM_LLM", "concurrency": "AM_CONCURRENCY", "verbose": "AM_VERBOSE", "name": "AM_AGENT_NAME",
    "max_iterations": "AM_MAX_ITERATIONS", "allow_commands": "AM_ALLOW_COMMANDS",
    "command_timeout": "AM_COMMAND_TIMEOUT_S",
}
LLM_ENV = {
    "base_url": "AM_LLM_BASE_URL", "model": "AM_LLM_MODEL", "api_key": "AM_LLM_API_KEY",
    "temperature": "AM_LLM_TEMPERATURE", "price_prompt_per_mtok": "AM_LLM_PRICE_PROMPT_PER_MTOK",
    "price_completion_per_mtok": "AM_LLM_PRICE_COMPLETION_PER_MTOK", "json_mode": "AM_LLM_JSON_MODE",
}


class ConfigError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="am-worker", description="Run an AgentManager worker.")
    p.add_argument("--server", help="AgentManager URL, e.g. http://127.0.0.1:8000 [AM_SERVER]")
    p.add_argument("--token", help="the agent's bearer token [AM_TOKEN]")
    p.add_argument("--roles", help="comma-separated roles to pull (default: all of the agent's) [AM_ROLES]")
    p.add_argument("--workspace", help="where the agent keeps its mirror of each project's workspace, "
                                       "one directory a project [AM_WORKSPACE]")
    p.add_argument("--llm", choices=["openai", "scripted"], help="LLM provider (default openai) [AM_LLM]")
    p.add_argument("--concurrency", type=int, help="steps worked at once (default 1) [AM_CONCURRENCY]")
    p.add_argument("--max-iterations", type=int, help="Reason+Act iterations per step (default 25)")
    p.add_argument("--allow-commands", action="store_true", default=None,
                   help="offer the LLM run_command: shell commands in the mirror (off by default) [AM_ALLOW_COMMANDS]")
    p.add_argument("--command-timeout", type=float, help="run_command's time limit in seconds (default 120) "
                                                         "[AM_COMMAND_TIMEOUT_S]")
    p.add_argument("--config", help="a TOML file with the same settings (and an [llm] table)")
    p.add_argument("--name", help="a name for the log lines")
    p.add_argument("--verbose", action="store_true", default=None, help="show each thought and action")
    p.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    return p


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def resolve(args: argparse.Namespace, environ: dict[str, str]) -> tuple[WorkerConfig, str, dict[str, Any]]:
    file: dict[str, Any] = {}
    config_path = args.config or environ.get("AM_CONFIG")
    if config_path:
        try:
            file = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read the config file {config_path}: {exc}") from None

    def pick(key: str, default: Any = None) -> Any:
        value = getattr(args, key, None)
        if value is not None:
            return value
        if environ.get(ENV[key]):
            return environ[ENV[key]]
        return file.get(key, default)

    server, token, workspace = pick("server"), pick("token"), pick("workspace")
    missing = [name for name, value in (("--server", server), ("--token", token), ("--workspace", workspace)) if not value]
    if missing:
        raise ConfigError(f"Missing {', '.join(missing)}: give them on the command line, in AM_* variables or --config.")
    roles = pick("roles", "")
    roles = [r.strip() for r in (roles.split(",") if isinstance(roles, str) else roles) if r.strip()]
    try:
        concurrency = int(pick("concurrency", 1))
        max_iterations = int(pick("max_iterations", 25))
    except ValueError as exc:
        raise ConfigError(f"concurrency and max-iterations are whole numbers: {exc}") from None
    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1.")
    try:
        command_timeout = float(pick("command_timeout", 120))
    except ValueError as exc:
        raise ConfigError(f"--command-timeout is a number of seconds: {exc}") from None
    if command_timeout <= 0:
        raise ConfigError("--command-timeout must be more than 0 seconds.")
    # In the file, `llm` is the provider's name, or a table of its options with `provider` in it.
    llm_file = file.get("llm", {}) if isinstance(file.get("llm"), dict) else {}
    llm_name = args.llm or environ.get(ENV["llm"]) or (
        llm_file.get("provider") if llm_file else file.get("llm")) or "openai"
    if llm_name not in ("openai", "scripted"):
        raise ConfigError(f"llm {llm_name!r} is not 'openai' or 'scripted'.")
    llm_options: dict[str, Any] = {}
    for key, variable in LLM_ENV.items():
        value = environ.get(variable) or llm_file.get(key)
        if value is None or value == "":
            continue
        if key in ("temperature", "price_prompt_per_mtok", "price_completion_per_mtok"):
            value = float(value)
        elif key == "json_mode":
            value = _bool(value)
        llm_options[key] = value
    config = WorkerConfig(
        server=server, token=token, roles=roles, workspace=Path(workspace).expanduser().resolve(),
        concurrency=concurrency, max_iterations=max_iterations, verbose=_bool(pick("verbose", False)),
        name=pick("name", "") or "", allow_commands=_bool(pick("allow_commands", False)),
        command_timeout_s=command_timeout,
    )
    return config, llm_name, llm_options


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config, llm_name, llm_options = resolve(args, dict(os.environ if environ is None else environ))
        llm = make_llm(llm_name, **(llm_options if llm_name == "openai" else {}))
        telemetry.setup(os.environ if environ is None else environ)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {config.name or 'agent'} %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if config.allow_commands:
        logging.getLogger("agents").info("run_command is offered to the LLM (--allow-commands)")
    build_worker(config, llm).run(concurrency=config.concurrency, max_steps=args.max_steps)
    return 0
