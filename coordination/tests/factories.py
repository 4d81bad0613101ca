"""Builders for test data, through the same services the application uses."""

from coordination.services import workflow_specs


def step(key: str, *deps: str, role: str = "developer", files: tuple = (), **extra) -> workflow_specs.StepSpec:
    return workflow_specs.StepSpec(
        key=key,
        name=extra.pop("name", f"Step {key}"),
        role=role,
        depends_on=tuple(deps),
        files=tuple(workflow_specs.FileSpec(path=p, mode=m) for p, m in files),
        **extra,
    )


def workflow_spec(*steps: workflow_specs.StepSpec, name: str = "Test workflow", **extra) -> workflow_specs.WorkflowSpec:
    return workflow_specs.WorkflowSpec(name=name, steps=tuple(steps), **extra)


def chain(length: int, role: str = "developer") -> workflow_specs.WorkflowSpec:
    """A straight line of `length` steps: s0 <- s1 <- ... ."""
    return workflow_spec(*(step(f"s{i}", *([f"s{i - 1}"] if i else []), role=role) for i in range(length)))


def fan(width: int, role: str = "developer") -> workflow_specs.WorkflowSpec:
    """One root, `width` steps that depend on it."""
    return workflow_spec(step("root", role=role), *(step(f"leaf{i}", "root", role=role) for i in range(width)))
