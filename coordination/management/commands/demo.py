import json
from pathlib import Path

from django.core.management.base import BaseCommand

from coordination.services import agent_registry, workflow_creation, workflow_specs

# A small product-research workflow: two parallel research branches meet in an
# architecture step, then development and documentation run side by side, and
# the final report gathers everything. The tester runs the tests it writes
# against the developer's code (its worker has --allow-commands), and its
# report is saved in the workspace with them; the final report edits the one
# the docs step began. Every file lives in the "demo" project's workspace.
DEMO_PROJECT = "demo"
DEMO_STEPS = [
    ("scope", "Define the scope", "researcher", [], [("research/scope.md", "write")]),
    ("users", "Interview notes on users", "researcher", ["scope"], [("research/users.md", "write")]),
    ("market", "Survey of the market", "analyst", ["scope"], [("research/market.md", "write")]),
    ("design", "Architecture proposal", "architect", ["users", "market"],
     [("design/architecture.md", "write"), ("research/", "read")]),
    ("build", "Implement the prototype", "developer", ["design"], [("src/prototype.py", "write")]),
    ("test", "Test the prototype", "tester", ["build"], [("tests/test_prototype.py", "write"), ("src/", "read")]),
    ("docs", "Write the user guide", "writer", ["design"], [("docs/guide.md", "write"), ("report.md", "write")]),
    ("report", "Final report", "writer", ["test", "docs"], [("report.md", "write")]),
]
DEMO_AGENTS = [
    ("demo-researcher", ["researcher", "analyst"], 2),
    ("demo-builder", ["architect", "developer"], 2),
    ("demo-writer", ["tester", "writer"], 2),
]


class Command(BaseCommand):
    help = (
        "Submit the demo workflow (eight steps, parallel branches, a shared report). With --agents-file, "
        "also make sure the demo agents exist and write their fresh tokens there, for `make run` to start them."
    )

    def add_arguments(self, parser):
        parser.add_argument("--agents-file", help="write the demo agents' tokens to this JSON file (mode 0600)")

    def handle(self, *args, agents_file=None, **options):
        if agents_file:
            agents = []
            for name, roles, capacity in DEMO_AGENTS:
                agent, token = agent_registry.agent_ensure(name=name, roles=roles, capacity=capacity)
                agents.append({"name": agent.name, "roles": agent.roles, "capacity": agent.capacity, "token": token})
            path = Path(agents_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(json.dumps(agents, indent=1))
            self.stdout.write(f"Demo agents ready: {', '.join(a['name'] for a in agents)}.")
        spec = workflow_specs.WorkflowSpec(
            name="Demo: prototype a note-taking app",
            goal="Research, design, build, test and document a small note-taking app.",
            project=DEMO_PROJECT,
            steps=tuple(
                workflow_specs.StepSpec(
                    key=key, name=name, role=role, description=f"{name} for the note-taking app prototype.",
                    depends_on=tuple(deps),
                    files=tuple(workflow_specs.FileSpec(path=path, mode=mode) for path, mode in files),
                )
                for key, name, role, deps, files in DEMO_STEPS
            ),
        )
        workflow = workflow_creation.workflow_create(spec=spec)
        self.stdout.write(f"Submitted demo workflow {workflow.name!r} ({workflow.id}) with {workflow.total_steps} steps, "
                          f"in project {DEMO_PROJECT!r}.")
