"""Shared plumbing for the benchmarks: a fresh database, servers to measure, clients, and reporting.

Every benchmark runs against one PostgreSQL (DATABASE_URL's server, else the
embedded one under var/) in a database of its own, `am_bench`, created fresh,
so figures compared in one run share the machine, the server and the data.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
BENCH_DB = os.environ.get("AM_BENCH_DATABASE", "am_bench")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _server_params() -> dict:
    url = os.environ.get("DATABASE_URL")
    if url:
        import dj_database_url

        parsed = dj_database_url.parse(url)
        return {"host": parsed["HOST"] or "127.0.0.1", "port": int(parsed["PORT"] or 5432),
                "user": parsed["USER"] or "postgres", "password": parsed["PASSWORD"] or ""}
    from am_project import embedded

    pg = embedded.ensure_postgres()
    return {"host": pg.host, "port": pg.port, "user": pg.user, "password": ""}


def database_url(params: dict, name: str = BENCH_DB) -> str:
    auth = quote(params["user"], safe="") + (f":{quote(params['password'], safe='')}" if params["password"] else "")
    return f"postgresql://{auth}@{quote(params['host'], safe='')}:{params['port']}/{name}"


def fresh_database() -> tuple[str, dict]:
    """Drop and create `am_bench`, migrate it, and point this process's Django at it."""
    import psycopg
    from psycopg import sql

    params = _server_params()
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [BENCH_DB])
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(BENCH_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    url = database_url(params)
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "am_project.settings")
    os.environ.setdefault("AM_LOG_LEVEL", "WARNING")
    say(f"database {BENCH_DB} on {params['host']}:{params['port']}: migrating")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, check=True)
    import django

    django.setup()
    return url, params


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Web servers to measure: the command, and the environment it runs with.
# `AM_WEB_WORKERS` sets the process count of the multi-process servers (default 3).
def _workers() -> str:
    return os.environ.get("AM_WEB_WORKERS", "3")


def _api_server(port: int) -> list[str]:
    from am_project.stack import api_server_command

    return api_server_command("127.0.0.1", port)


SERVERS = {
    # daphne: one process, every request on the event loop, sync views in threads; a pool per process.
    "daphne": (lambda port: [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                             "am_project.asgi:application"], {"AM_DB_POOL": "1"}),
    # gunicorn with uvicorn workers: the same ASGI application in several processes.
    "gunicorn-uvicorn": (lambda port: [sys.executable, "-m", "gunicorn", "am_project.asgi:application",
                                       "-k", "uvicorn_worker.UvicornWorker", "-w", _workers(),
                                       "-b", f"127.0.0.1:{port}", "--log-level", "warning"], {"AM_DB_POOL": "1"}),
    # gunicorn with threads (WSGI), as `make run` starts it for the worker API (am_project/stack.py).
    "gunicorn-gthread": (lambda port: _api_server(port), {"AM_DB_POOL": "1"}),
}


@contextmanager
def server(kind: str, *, bare: bool = False):
    """Start a web server on the bench database; yield (base URL, process).

    `bare=True` serves bench/bare_urls.py (the ceiling views) instead of AgentManager's URLs.
    """
    import httpx

    port = free_port()
    command, server_env = SERVERS[kind]
    env = {**os.environ, "AM_LOG_LEVEL": "WARNING", **server_env}
    if bare:
        env["DJANGO_SETTINGS_MODULE"] = "bare_settings"
        env["PYTHONPATH"] = os.pathsep.join([str(BASE_DIR / "bench"), str(BASE_DIR)])
    process = subprocess.Popen(command(port), cwd=BASE_DIR, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{kind} did not answer /healthz within 60 s")
        time.sleep(0.2)
    try:
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def run_clients(client, count: int, seconds: float, what: str) -> float:
    """Run `client(index, stop, errors)` in `count` threads for `seconds`; return the seconds it took.

    A client loops until `stop` is set; on a failed request it appends why to
    `errors` and returns, and then this raises, naming `what` failed.
    """
    import threading

    errors: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(index, stop, errors)) for index in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{what} failed: {errors[:3]}")
    return time.monotonic() - started


def pull_and_report(http, role: str = "bench"):
    """One agent cycle over HTTP: pull a step of `role`, report it completed. Returns (pull response, error)."""
    pulled = http.get(f"/v1/tasks/{role}/ready")
    if pulled.status_code != 200:
        return pulled, f"pull {pulled.status_code}"
    body = pulled.json()
    reported = http.post("/v1/report_result", json={
        "step_id": body["step"]["id"], "lease_token": body["lease"]["token"], "status": "completed"})
    if reported.status_code != 200:
        return pulled, f"report {reported.status_code}"
    return pulled, ""


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object with its figures."""
    print(json.dumps({**result, "machine": machine()}), flush=True)


__all__ = ["database_url", "emit", "fresh_database", "percentile", "pull_and_report", "run_clients", "say", "server",
           "statistics", "table"]
