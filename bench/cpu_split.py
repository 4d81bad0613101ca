"""Where the CPU goes: milliseconds of CPU per cycle, by process, for a workload and for the bare views.

The ratio goals of `bench/goals.py` compare AgentManager's cycles with the bare
views' on two cores that the clients, the web server and PostgreSQL share, so a
cycle's cost is its CPU time across all of them. This runs each workload at 8
clients on the worker API server as `make run` serves it (gunicorn with threads)
and reads the CPU time of every process from /proc before and after:
- `pull+report`: pull a step, report it completed (one workflow of many steps);
- `locks`: acquire a lock on a path of one's own, release it;
- `bare`: the two one-statement bare views (bench/bare_urls.py), the ceiling.

    python bench/cpu_split.py [--seconds 5] [--workloads pull+report,locks,bare]
"""

from __future__ import annotations

import argparse
import os
import time

from _harness import emit, fresh_database, say, server, table

CLIENTS = 8
HZ = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / HZ  # utime + stime


def _processes() -> dict[int, str]:
    """Every process of the stack on this machine, by kind (any PostgreSQL or Redis server of the machine counts:
    run it on a quiet one); the clients are this process."""
    kinds = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline") as cmdline:
                command = cmdline.read().replace("\0", " ")
        except OSError:
            continue
        if "gunicorn" in command:
            kinds[int(entry)] = "server"
        elif command.startswith("postgres") or "postgres:" in command or "/bin/postgres " in command:
            kinds[int(entry)] = "postgres"
        elif "redis" in command:
            kinds[int(entry)] = "redis"
    kinds[os.getpid()] = "clients"
    return kinds


def measure(work) -> tuple[float, dict[str, float], float]:
    """Run `work()` (it returns cycles per second over `seconds`); return the rate, CPU ms per cycle by kind,
    and the cores kept busy."""
    before = {pid: _cpu_seconds(pid) for pid in _processes()}
    started = time.monotonic()
    rate, seconds = work()
    wall = time.monotonic() - started
    split: dict[str, float] = {}
    for pid, kind in _processes().items():
        split[kind] = split.get(kind, 0.0) + _cpu_seconds(pid) - before.get(pid, 0.0)
    cycles = rate * seconds
    return rate, {kind: round(used * 1000 / cycles, 2) for kind, used in sorted(split.items())}, sum(split.values()) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workloads", default="pull+report,locks,bare")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    url, params = fresh_database()

    import dispatch
    import goals
    import locks as lock_bench

    s = args.seconds
    say("seeding steps and agents")
    goals.seed("bench", int(1000 * s) + 3000)
    singles = goals.agents("single", CLIENTS, ["bench"])
    lockers = goals.agents("locker", CLIENTS, ["bench"])
    dispatch.bare_setup(params, int(2000 * s) + 5000)
    results = {}
    if "pull+report" in workloads or "locks" in workloads:
        with server("gunicorn-gthread") as (base, _process):
            goals.cycles(base, singles, 1.0, "bench")  # warm up every worker process
            if "pull+report" in workloads:
                results["pull+report"] = measure(lambda: (goals.cycles(base, singles, s, "bench"), s))
            if "locks" in workloads:
                results["locks"] = measure(
                    lambda: (lock_bench.run(base, lockers, s, "uncontended")["cycles_per_s"], s))
    if "bare" in workloads:
        with server("gunicorn-gthread", bare=True) as (base, _process):
            dispatch.bare_round_trips(base, CLIENTS, 1.0)
            results["bare"] = measure(lambda: (dispatch.bare_round_trips(base, CLIENTS, s)[0], s))
    kinds = sorted({kind for _, split, _ in results.values() for kind in split})
    rows = [(name, f"{rate:.0f}/s", *(f"{split.get(kind, 0):.2f}" for kind in kinds),
             f"{sum(split.values()):.2f}", f"{busy:.2f}") for name, (rate, split, busy) in results.items()]
    table(f"CPU per cycle, ms ({CLIENTS} clients, gunicorn-gthread)",
          ["workload", "cycles", *kinds, "total", "cores busy"], rows)
    emit({"benchmark": "cpu_split", "seconds": s, "clients": CLIENTS,
          "results": {name: {"rate": round(rate, 1), "cpu_ms_per_cycle": split, "cores_busy": round(busy, 2)}
                      for name, (rate, split, busy) in results.items()}})


if __name__ == "__main__":
    main()
