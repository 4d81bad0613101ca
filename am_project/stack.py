"""`make run`: the whole stack in one terminal.

1. PostgreSQL and Redis: DATABASE_URL / REDIS_URL when set, else the embedded
   ones under var/ (started here, or attached to when already running).
2. Migrate, make sure an admin user exists.
3. Start daphne (dashboard, WebSockets, and the API too) on PORT, gunicorn
   with threads (the worker API, about twice daphne's throughput) on
   AM_API_PORT, a Celery worker and Celery beat, with the service URLs in
   their environment so they all use the same servers.
4. Wait for /healthz, print the URLs; with AM_DEMO on, start the demo.
5. On Ctrl-C (SIGINT) or SIGTERM, stop every process started here, and the
   embedded servers if this run started them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from am_project import embedded
from am_project.env import env_bool, env_int, env_str

BASE_DIR = Path(__file__).resolve().parent.parent


def _say(message: str) -> None:
    print(f"[am] {message}", flush=True)


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.optional: set[str] = set()
        self.started_postgres = False
        self.started_redis = False
        self.stopping = False

    def services(self, env: dict[str, str]) -> None:
        base = embedded.var_dir()
        if env.get("DATABASE_URL"):
            _say("PostgreSQL: DATABASE_URL")
        else:
            self.started_postgres = not embedded.postgres_running(base)
            params = embedded.ensure_postgres(base)
            env["DATABASE_URL"] = params.url
            _say(f"PostgreSQL: embedded, data in {base / 'pgdata'}")
        if env.get("REDIS_URL"):
            _say("Redis: REDIS_URL")
        else:
            url = embedded.redis_url(base)
            self.started_redis = not embedded._redis_answers(url)
            env["REDIS_URL"] = embedded.ensure_redis(base)
            _say(f"Redis: embedded, data in {base / 'redis'}")

    def manage(self, env: dict[str, str], *args: str) -> None:
        subprocess.run([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, check=True)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], *, essential: bool = True) -> None:
        # Own process group: Ctrl-C in the terminal reaches us, and we stop children in order.
        process = subprocess.Popen(argv, cwd=BASE_DIR, env=env, start_new_session=True)
        self.children.append((name, process))
        if not essential:
            self.optional.add(name)

    def start_demo_agents(self, env: dict[str, str], base_url: str) -> None:
        """Scripted agents, each with its own mirror under var/demo/<agent>/, sharing no disk: they build one
        workspace through the server. Each answer is slowed so the work can be watched."""
        demo_dir = embedded.var_dir() / "demo"
        agents_file = demo_dir / "agents.json"
        self.manage(env, "demo", "--agents-file", str(agents_file))
        agents = json.loads(agents_file.read_text())
        agents_file.unlink()
        worker_env = {k: v for k, v in env.items() if k != "DJANGO_SETTINGS_MODULE"}
        worker_env.setdefault("AM_SCRIPTED_DELAY_S", "1.5")
        for agent in agents:
            # The tester runs the tests it wrote: its scripted commands are known and local.
            commands = ["--allow-commands"] if "tester" in agent["roles"] else []
            self.spawn(agent["name"], [
                sys.executable, "-m", "agents", "--server", base_url,
                "--workspace", str(demo_dir / agent["name"]), "--llm", "scripted",
                "--concurrency", str(agent["capacity"]), "--name", agent["name"], *commands,
            ], {**worker_env, "AM_TOKEN": agent["token"]}, essential=False)  # not in argv, which anyone can read
        _say(f"Demo: {len(agents)} scripted agents, each with its own mirror under {demo_dir}/<agent>/")

    def wait_healthy(self, url: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.children:
                if process.poll() is not None and name not in self.optional:
                    _say(f"{name} exited with code {process.returncode} during start-up; see its output above.")
                    return False
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        _say(f"{url} did not answer 200 within {timeout:.0f} s.")
        return False

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        _say("Stopping...")
        # Agents first, while the server can still take their hand-backs and results.
        agents = [(n, p) for n, p in self.children if n in self.optional]
        others = [(n, p) for n, p in self.children if n not in self.optional]
        for group in (agents, others):
            for _name, process in reversed(group):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            self._wait(group)
        self._stop_services()

    def _wait(self, group) -> None:
        deadline = time.monotonic() + 20
        for name, process in reversed(group):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"{name} did not stop within 20 s; killing it.")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def _stop_services(self) -> None:
        base = embedded.var_dir()
        if self.started_redis:
            embedded.stop_redis(base)
            _say("Stopped the embedded Redis.")
        if self.started_postgres:
            embedded.stop_postgres(base)
            _say("Stopped the embedded PostgreSQL.")
        _say("Stopped.")


def api_server_command(host: str, port: int) -> list[str]:
    """gunicorn with threads for the worker API: no event loop in the request path.

    A long-polling pull holds a thread while it waits (and no database
    connection), so workers x threads bounds the agents that can wait at once.
    """
    workers = env_int("AM_API_WORKERS", os.cpu_count() or 2, minimum=1)
    threads = env_int("AM_API_THREADS", 200, minimum=1)
    return [sys.executable, "-m", "gunicorn", "am_project.wsgi:application", "-k", "gthread",
            "-w", str(workers), "--threads", str(threads), "-b", f"{host}:{port}",
            "--graceful-timeout", "10", "--log-level", "warning"]


def main() -> int:
    host = env_str("HOST", "127.0.0.1")
    port = env_int("PORT", 8000, minimum=1, maximum=65535)
    api_port = env_int("AM_API_PORT", port + 1, minimum=1, maximum=65535)
    demo = env_bool("AM_DEMO", True)
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "am_project.settings")
    # Each server process keeps a pool of connections instead of opening one per request.
    env.setdefault("AM_DB_POOL", "1")
    if demo and not env.get("AM_LLM"):
        # The demo plans goals and audits offline; set AM_LLM=openai (and AM_LLM_*) for a real model.
        env["AM_LLM"] = "scripted"
        _say("LLM: scripted (offline); set AM_LLM=openai and AM_LLM_BASE_URL / AM_LLM_MODEL for a real one")
    env["PYTHONUNBUFFERED"] = "1"
    stack = Stack()

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.services(env)
        _say("Applying database migrations...")
        stack.manage(env, "migrate", "--no-input", "-v", "0")
        stack.manage(env, "ensure_admin")
        python = sys.executable
        stack.spawn("daphne", [python, "-m", "daphne", "-b", host, "-p", str(port), "am_project.asgi:application"], env)
        stack.spawn("api server", api_server_command(host, api_port), env)
        stack.spawn(
            "celery worker",
            [python, "-m", "celery", "-A", "am_project", "worker", "-l", "info", "--concurrency", "2", "-n", "am@%h"],
            env,
        )
        schedule = embedded.var_dir() / "celerybeat-schedule"
        stack.spawn("celery beat", [python, "-m", "celery", "-A", "am_project", "beat", "-l", "info", "-s", str(schedule)], env)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base_url = f"http://{shown_host}:{port}"
        api_url = f"http://{shown_host}:{api_port}"
        if not (stack.wait_healthy(f"{base_url}/healthz") and stack.wait_healthy(f"{api_url}/healthz")):
            stack.stop()
            return 1
        if demo:
            stack.start_demo_agents(env, api_url)
        _say("AgentManager is up:")
        _say(f"  dashboard  {base_url}/")
        _say(f"  admin      {base_url}/admin/")
        _say(f"  API docs   {base_url}/v1/docs")
        _say(f"  agents     {api_url}  (the worker API's own server; {base_url} serves it too)")
        _say(f"  health     {base_url}/healthz")
        _say("Press Ctrl-C to stop.")
        reported: set[str] = set()
        while True:
            for name, process in stack.children:
                if process.poll() is None or name in reported:
                    continue
                if name in stack.optional:
                    _say(f"{name} exited with code {process.returncode}; the rest of the stack carries on.")
                    reported.add(name)
                    continue
                _say(f"{name} exited with code {process.returncode}; stopping the stack.")
                stack.stop()
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        stack.stop()
        return 0
    except subprocess.CalledProcessError as exc:
        _say(f"{' '.join(map(str, exc.cmd[1:]))} failed with code {exc.returncode}.")
        stack.stop()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
