"""A worker built on the SDK, run as its own process by the SIGTERM tests.

`python -m agents.tests.sdk_sigterm_worker MODE` with AM_SERVER, AM_TOKEN, AM_WORKSPACE and
AM_GRACE_S in the environment. MODE is how its handler behaves:
- `short`: works 3 s (through the SDK), then completes.
- `long`: works 120 s through the SDK (`step.sleep`), so the worker's stop reaches it.
- `deaf`: sleeps 120 s without a single SDK call, so only the worker's hand-back can end it.
"""

import logging
import os
import sys
import time

from agents import Worker

MODE = sys.argv[1]

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
logging.getLogger("httpx").setLevel(logging.WARNING)
worker = Worker(os.environ["AM_SERVER"], os.environ["AM_TOKEN"], workspace=os.environ["AM_WORKSPACE"],
                poll_wait_s=1, shutdown_grace_s=float(os.environ["AM_GRACE_S"]))


@worker.step("developer")
def work(step):
    print(f"started {step.key}", flush=True)
    if MODE == "deaf":
        time.sleep(120)
        return "too late"
    seconds = 3 if MODE == "short" else 120
    for tick in range(seconds * 5):
        step.log(thought=f"tick {tick}") if tick % 5 == 0 else None
        step.sleep(0.2)
    return f"{step.key} finished"


worker.run(concurrency=1)
