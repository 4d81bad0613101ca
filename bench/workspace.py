"""The workspace: 4 KB writes and reads per second through the HTTP API, beside the local filesystem and the
framework's ceiling; and export and import of a 1,000-file, 10 MB workspace.

On the worker API server as `make run` serves it, `--clients` agents each hold
a write lock on a directory of their own and, for `--seconds`:
- write 4 KB files into it (`PUT /v1/projects/bench/files/...` with the lock's
  fencing number: a new version each), then
- read them back (`GET`).
The same work on the local filesystem (write + fsync, as a commit is durable;
read) runs in as many threads, and the bare one-statement views of
bench/dispatch.py give the ceiling of Django, DRF and the server on this
machine (requests per second). Then `manage.py workspace_export` and
`workspace_import` move a 1,000-file, 10 MB workspace out and in.

    python bench/workspace.py [--clients 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import BASE_DIR, emit, fresh_database, percentile, run_clients, say, server, table

FILE_BYTES = 4096
NAMES_PER_CLIENT = 200


def http_rate(url: str, agents: list[tuple[str, int]], seconds: float, operation: str,
              written: list[int] | None = None) -> dict:
    """Writes (cycling over NAMES_PER_CLIENT names), or reads of the names each client wrote (`written`)."""
    import threading

    import httpx

    done = [0] * len(agents)
    latencies: list[float] = []
    guard = threading.Lock()
    payload = os.urandom(FILE_BYTES)

    def client(index: int, stop, errors: list[str]) -> None:
        token, fencing = agents[index]
        headers = {"Authorization": f"Bearer {token}", "X-AM-Fencing": str(fencing)}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            n = 0
            names = NAMES_PER_CLIENT if written is None else max(1, min(written[index], NAMES_PER_CLIENT))
            while not stop.is_set():
                path = f"/v1/projects/bench/files/agent{index}/file{n % names}.bin"
                started = time.perf_counter()
                if operation == "write":
                    response = http.put(path, content=payload)
                else:
                    response = http.get(path)
                if response.status_code != 200:
                    errors.append(f"{operation} {response.status_code} {response.text[:200]}")
                    return
                with guard:
                    latencies.append(time.perf_counter() - started)
                n += 1
                done[index] += 1

    elapsed = run_clients(client, len(agents), seconds, f"workspace {operation}s")
    return {"per_s": round(sum(done) / elapsed, 1), "count": sum(done), "per_client": done,
            "p50_ms": round(percentile(latencies, 50) * 1000, 1), "p99_ms": round(percentile(latencies, 99) * 1000, 1)}


def filesystem_rate(clients: int, seconds: float, operation: str, root: Path) -> dict:
    payload = os.urandom(FILE_BYTES)
    done = [0] * clients

    def client(index: int, stop, errors: list[str]) -> None:
        folder = root / f"agent{index}"
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        while not stop.is_set():
            target = folder / f"file{n % NAMES_PER_CLIENT}.bin"
            if operation == "write":
                with open(target, "wb") as handle:
                    handle.write(payload)
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                target.read_bytes()
            n += 1
            done[index] += 1

    elapsed = run_clients(client, clients, seconds, f"filesystem {operation}s")
    return {"per_s": round(sum(done) / elapsed, 1), "count": sum(done)}


def prepare_agents(clients: int) -> list[tuple[str, int]]:
    """`clients` agents, each holding a write lock on its own directory of the `bench` project."""
    from coordination.services import agent_registry, file_locks, projects

    projects.project_create(name="bench")
    agents = []
    for index in range(clients):
        agent, token = agent_registry.agent_create(name=f"writer-{index}", roles=["bench"])
        [lock] = file_locks.locks_acquire(agent=agent, paths=[f"agent{index}/"], mode="write", project_name="bench",
                                          ttl_s=3600)
        agents.append((token, lock.fencing))
    return agents


def bare_requests_per_s(params: dict, kind: str, clients: int, seconds: float) -> float:
    """The ceiling: bench/dispatch.py's bare views (two requests per round trip) on the same server."""
    sys.path.insert(0, str(BASE_DIR / "bench"))
    from dispatch import bare_round_trips, bare_setup

    bare_setup(params, 200_000)
    with server(kind, bare=True) as (base, _process):
        bare_round_trips(base, 2, 1.0)
        rate, _count = bare_round_trips(base, clients, seconds)
    return 2 * rate


def export_import(files: int, total_bytes: int) -> dict:
    """Seconds to import a 1,000-file workspace from a directory, export it as .tar.gz, and import that."""
    env = {**os.environ, "AM_LOG_LEVEL": "WARNING"}
    size = total_bytes // files
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source"
        for index in range(files):
            target = source / f"dir{index % 20}" / f"file{index}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(os.urandom(size // 2).hex().encode()[:size])
        timings = {}
        for label, argv in (
            ("import_dir_s", ["workspace_import", "exported", str(source)]),
            ("export_tgz_s", ["workspace_export", "exported", str(Path(scratch) / "out.tar.gz")]),
            ("import_tgz_s", ["workspace_import", "reimported", str(Path(scratch) / "out.tar.gz")]),
            ("export_dir_s", ["workspace_export", "reimported", str(Path(scratch) / "out")]),
        ):
            started = time.perf_counter()
            subprocess.run([sys.executable, "manage.py", *argv], cwd=BASE_DIR, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            timings[label] = round(time.perf_counter() - started, 2)
            say(f"{label}: {timings[label]} s")
        exported = sorted(p.relative_to(Path(scratch) / "out") for p in (Path(scratch) / "out").rglob("*") if p.is_file())
        assert len(exported) == files, f"the round trip kept {len(exported)} of {files} files"
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--server", default="gunicorn-gthread")
    args = parser.parse_args()
    _url, params = fresh_database()
    agents = prepare_agents(args.clients)
    results: dict = {}
    with server(args.server) as (base, _process):
        say("warming up")
        warm = http_rate(base, agents, 1.0, "write")
        results["http_write"] = http_rate(base, agents, args.seconds, "write")
        written = [max(a, b) for a, b in zip(warm["per_client"], results["http_write"]["per_client"])]
        results["http_read"] = http_rate(base, agents, args.seconds, "read", written=written)
        for operation in ("write", "read"):
            say(f"HTTP {operation}s x{args.clients}: {results[f'http_{operation}']['per_s']}/s")
    with tempfile.TemporaryDirectory(dir=BASE_DIR / "var") as root:
        for operation in ("write", "read"):
            results[f"fs_{operation}"] = filesystem_rate(args.clients, args.seconds, operation, Path(root))
            say(f"filesystem {operation}s x{args.clients}: {results[f'fs_{operation}']['per_s']}/s")
    ceiling = bare_requests_per_s(params, args.server, args.clients, args.seconds)
    say(f"bare views x{args.clients}: {ceiling:.0f} requests/s")
    rows = []
    for operation in ("write", "read"):
        http = results[f"http_{operation}"]
        fs = results[f"fs_{operation}"]
        rows.append([operation, http["per_s"], http["p50_ms"], http["p99_ms"], fs["per_s"],
                     f"{http['per_s'] / fs['per_s']:.3f}", round(ceiling, 1), f"{http['per_s'] / ceiling:.2f}"])
    table(f"4 KB files at {args.clients} clients, {args.server} (per second)",
          ["op", "HTTP/s", "p50 ms", "p99 ms", "local fs/s", "HTTP/fs", "bare views/s", "HTTP/bare"], rows)
    moved = export_import(1000, 10 * 1024 * 1024)
    table("1,000 files, 10 MB", ["step", "seconds"], [[k, v] for k, v in moved.items()])
    emit({"benchmark": "workspace", "clients": args.clients, "server": args.server, "bare_requests_per_s":
          round(ceiling, 1), **results, "export_import": moved})


if __name__ == "__main__":
    main()
