"""Runnable workers built on the SDK: `python -m agents.examples.plain_worker`, `...langgraph_worker`."""
