"""An agent built with LangGraph, run as an AgentManager worker: the graph is the agent, the handler adapts it.

    pip install langgraph          # only for this example; the worker itself does not need it
    AM_SERVER=http://127.0.0.1:8000 AM_TOKEN=... AM_WORKSPACE=~/am-mirrors \
        python -m agents.examples.langgraph_worker

The graph outlines a document from the step's description and the results of the
steps before it, drafts it, and reviews the draft (back to drafting, at most three
rounds, while the review finds a section missing). The handler runs the graph
with `stream_mode="updates"`, so each node's update is streamed to AgentManager
as an iteration while the graph runs (and a cancelled workflow stops it between
two nodes); the reviewed document is written to the workspace, fenced.

The draft node asks an OpenAI-compatible endpoint when `AM_LLM_MODEL` is set
(`AM_LLM_BASE_URL`, `AM_LLM_API_KEY`, as for `python -m agents`), and fills a
template otherwise, so the example runs offline.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from agents import Result, Retryable, Step, Worker

MAX_ROUNDS = 3

worker = Worker(
    server=os.environ.get("AM_SERVER", "http://127.0.0.1:8000"),
    token=os.environ.get("AM_TOKEN", ""),
    workspace=os.environ.get("AM_WORKSPACE"),
    name=os.environ.get("AM_AGENT_NAME", "langgraph-writer"),
)


class Document(TypedDict, total=False):
    brief: str
    sources: dict[str, str]
    outline: list[str]
    text: str
    review: str
    rounds: int
    usage: dict[str, Any]


def template_writer(state: Document) -> tuple[str, dict[str, Any] | None]:
    parts = [f"# {state['brief']}\n"]
    for heading in state["outline"]:
        found = state["sources"].get(heading, "")
        parts.append(f"## {heading}\n\n{found or 'Drawn from the brief: ' + state['brief']}\n")
    return "\n".join(parts), None


def llm_writer(state: Document) -> tuple[str, dict[str, Any] | None]:
    import openai

    client = openai.OpenAI(base_url=os.environ.get("AM_LLM_BASE_URL"), api_key=os.environ.get("AM_LLM_API_KEY")
                           or "not-needed")
    prompt = (f"Write a Markdown document for: {state['brief']}\nUse exactly these sections, each as a '## ' "
              f"heading: {', '.join(state['outline'])}.\nMaterial: {state['sources']}\n"
              + (f"A reviewer said of the last draft: {state['review']}\n" if state.get("review") else ""))
    response = client.chat.completions.create(model=os.environ["AM_LLM_MODEL"],
                                              messages=[{"role": "user", "content": prompt}])
    usage = response.usage
    return response.choices[0].message.content or "", {
        "model": response.model, "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
        "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}


def build_graph(writer=None):
    """outline -> draft -> review -> (draft again | end)."""
    writer = writer or (llm_writer if os.environ.get("AM_LLM_MODEL") else template_writer)

    def outline(state: Document) -> Document:
        return {"outline": ["Summary", *sorted(state["sources"]), "Next steps"], "rounds": 0}

    def draft(state: Document) -> Document:
        text, usage = writer(state)
        return {"text": text, "rounds": state["rounds"] + 1, "usage": usage or {}}

    def review(state: Document) -> Document:
        missing = [h for h in state["outline"] if f"## {h}" not in state["text"]]
        return {"review": "ok" if not missing else f"sections missing: {', '.join(missing)}"}

    def route(state: Document) -> str:
        return END if state["review"] == "ok" or state["rounds"] >= MAX_ROUNDS else "draft"

    graph = StateGraph(Document)
    graph.add_node("outline", outline)
    graph.add_node("draft", draft)
    graph.add_node("review", review)
    graph.add_edge(START, "outline")
    graph.add_edge("outline", "draft")
    graph.add_edge("draft", "review")
    graph.add_conditional_edges("review", route, {"draft": "draft", END: END})
    return graph.compile()


GRAPH = build_graph()


def _shown(update: Document) -> str:
    return "; ".join(f"{key}={str(value)[:300]}" for key, value in update.items() if key != "usage")


@worker.step(*[r.strip() for r in os.environ.get("AM_ROLES", "writer").split(",") if r.strip()])
def run_graph(step: Step) -> Result:
    state: Document = {
        "brief": step.description or step.name,
        "sources": {key: str(value.get("final_result", "")) for key, value in step.inputs.items()
                    if isinstance(value, dict) and not key.startswith("_")},
    }
    final: Document = dict(state)
    for update in GRAPH.stream(state, stream_mode="updates"):
        for node, change in update.items():
            change = change or {}
            final.update(change)
            if change.get("usage"):
                step.add_usage(change["usage"])
            # Streamed at once with a heartbeat; raises Cancelled if the workflow was cancelled meanwhile.
            step.log(thought=f"LangGraph node {node!r} ran (round {final.get('rounds', 0)}).", action=node,
                     observation=_shown(change))
    if final.get("review") != "ok":
        raise Retryable(f"The draft did not pass review after {final.get('rounds')} rounds: {final.get('review')}")
    declared = [f["path"] for f in step.files if f.get("mode") == "write" and not f["path"].endswith("/")]
    path = declared[0] if declared else f"docs/{step.key}.md"
    step.write(path, final["text"])
    return Result(final_result=f"Wrote {path} in {final['rounds']} round(s).",
                  outputs={"path": path, "sections": final["outline"], "rounds": final["rounds"]})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    worker.run(concurrency=int(os.environ.get("AM_CONCURRENCY", "2")))
