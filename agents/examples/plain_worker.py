"""A plain Python function as an AgentManager worker: no LLM, no framework.

    AM_SERVER=http://127.0.0.1:8000 AM_TOKEN=... AM_WORKSPACE=~/am-mirrors \
        python -m agents.examples.plain_worker

It takes `writer` steps: it gathers the results of the steps its step depends on,
writes them up as a Markdown note (the step's declared file, else
`notes/<key>.md`), and adds a line to the project's shared `notes/index.md`.
Several workers, on any machine, may append to that index at once: the write
lock taken around the read-modify-write keeps every line.
"""

from __future__ import annotations

import logging
import os
import sys

from agents import Failed, Result, Step, Worker

worker = Worker(
    server=os.environ.get("AM_SERVER", "http://127.0.0.1:8000"),
    token=os.environ.get("AM_TOKEN", ""),
    workspace=os.environ.get("AM_WORKSPACE"),
    name=os.environ.get("AM_AGENT_NAME", "plain-writer"),
)


def target_path(step: Step) -> str:
    declared = [f["path"] for f in step.files if f.get("mode") == "write" and not f["path"].endswith("/")]
    return declared[0] if declared else f"notes/{step.key}.md"


@worker.step("writer")
def write_up(step: Step) -> Result:
    if not step.description and not step.inputs:
        raise Failed("Nothing to write up: the step has no description and no inputs.")
    step.log(thought="Gather what the steps before this one found.", action="read inputs",
             observation=", ".join(sorted(step.inputs)) or "(no inputs)")
    sections = [f"## {key}\n\n{value.get('final_result', '')}\n" for key, value in sorted(step.inputs.items())
                if isinstance(value, dict)]
    note = f"# {step.name}\n\n{step.description}\n\n" + "\n".join(sections)

    path = target_path(step)
    written = step.write(path, note)  # fenced: the lease's lock on a declared file, else one taken now
    step.log(thought="Write the note.", action=f"write {path}", observation=f"version {written['version']}")

    # A file every writer step appends to: lock it, read it as it is now, write it back.
    with step.lock("notes/index.md"):
        index = step.read("notes/index.md") if step.exists("notes/index.md") else "# Notes\n\n"
        step.write("notes/index.md", index + f"- [{step.name}]({path})\n")
    step.log(thought="List it in the index.", action="append notes/index.md", observation=path)
    return Result(final_result=f"Wrote {path} ({len(note)} characters).", outputs={"path": path})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    worker.run(concurrency=int(os.environ.get("AM_CONCURRENCY", "2")))
