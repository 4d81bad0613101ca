from django.core.management.base import BaseCommand

from coordination import services

# A small product-research workflow: two parallel research branches meet in an
# architecture step, then development and testing share `report.md`.
DEMO_STEPS = [
    ("scope", "Define the scope", "researcher", [], [("research/scope.md", "write")]),
    ("users", "Interview notes on users", "researcher", ["scope"], [("research/users.md", "write")]),
    ("market", "Survey of the market", "analyst", ["scope"], [("research/market.md", "write")]),
    ("design", "Architecture proposal", "architect", ["users", "market"], [("design/architecture.md", "write")]),
    ("build", "Implement the prototype", "developer", ["design"], [("src/prototype.py", "write")]),
    ("test", "Test the prototype", "tester", ["build"], [("tests/test_prototype.py", "write")]),
    ("docs", "Write the user guide", "writer", ["design"], [("docs/guide.md", "write")]),
    ("report", "Final report", "writer", ["test", "docs"], [("report.md", "write")]),
]


class Command(BaseCommand):
    help = "Submit the demo workflow (eight steps, parallel branches, a shared report)."

    def handle(self, *args, **options):
        spec = services.WorkflowSpec(
            name="Demo: prototype a note-taking app",
            goal="Research, design, build, test and document a small note-taking app.",
            steps=tuple(
                services.StepSpec(
                    key=key,
                    name=name,
                    role=role,
                    description=f"{name} for the note-taking app prototype.",
                    depends_on=tuple(deps),
                    files=tuple(services.FileSpec(path=path, mode=mode) for path, mode in files),
                )
                for key, name, role, deps, files in DEMO_STEPS
            ),
        )
        workflow = services.workflow_create(spec=spec)
        self.stdout.write(f"Submitted demo workflow {workflow.name!r} ({workflow.id}) with {workflow.total_steps} steps.")
