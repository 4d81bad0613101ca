"""Coordination's own fixtures; the shared ones (people, agents, spec builders, live servers) are in the root
conftest.py."""

import pytest


@pytest.fixture
def chain(step, workflow_spec):
    """`chain(length, role=...)`: a straight line of steps, s0 <- s1 <- ... ."""
    def chain(length: int, role: str = "developer"):
        return workflow_spec(*(step(f"s{i}", *([f"s{i - 1}"] if i else []), role=role) for i in range(length)))
    return chain


@pytest.fixture
def fan(step, workflow_spec):
    """`fan(width, role=...)`: one root and `width` steps that depend on it."""
    def fan(width: int, role: str = "developer"):
        return workflow_spec(step("root", role=role), *(step(f"leaf{i}", "root", role=role) for i in range(width)))
    return fan
