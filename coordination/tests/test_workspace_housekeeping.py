"""The audit's writes check reads the server's records; unused contents are collected in bounded batches."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination import selectors, tasks
from coordination.models import Blob, FileVersion, Workflow
from coordination.services import agent_registry, projects, pull, workflow_creation, workflow_specs, workspace

pytestmark = pytest.mark.django_db


def _edit_workflow() -> tuple[Workflow, object, object]:
    projects.project_create(name="site")
    agent, _ = agent_registry.agent_create(name="writer", roles=["developer"])
    spec = workflow_specs.WorkflowSpec(name="edit", project="site", steps=(workflow_specs.StepSpec(
        key="A", name="edit", role="developer", files=(workflow_specs.FileSpec(path="index.html"),)),))
    workflow = workflow_creation.workflow_create(spec=spec)
    lease = pull.step_pull(agent=agent, roles=["developer"])
    return workflow, agent, lease


class AuditWritesCheckTests:
    def test_every_change_under_a_live_lock_passes(self):
        workflow, agent, lease = _edit_workflow()
        workspace.workspace_write(project_name="site", agent=agent, changes=[
            workspace.Change(path="index.html", content=b"<h1>hi</h1>", fencing=lease.locks[0].fencing)])
        check = next(c for c in selectors.workflow_audit_checks(workflow=workflow) if c["name"] == "writes_locked")
        assert check["passed"] and "1 file change(s)" in check["detail"]

    def test_a_change_the_records_show_outside_a_lock_is_named(self):
        workflow, agent, lease = _edit_workflow()
        workspace.workspace_write(project_name="site", agent=agent, changes=[
            workspace.Change(path="index.html", content=b"<h1>hi</h1>", fencing=lease.locks[0].fencing)])
        # The records say the change was made after its lock ended (as a write around the server would show).
        version = FileVersion.objects.get(path="index.html")
        FileVersion.objects.filter(id=version.id).update(changed_at=timezone.now() + timedelta(hours=2))
        check = next(c for c in selectors.workflow_audit_checks(workflow=workflow) if c["name"] == "writes_locked")
        assert not check["passed"] and check["steps"] == ["A"]
        assert "A:index.html@1" in check["detail"]


class ContentCollectionTests:
    def test_contents_no_version_points_to_are_removed_after_the_grace_period(self):
        workflow, agent, lease = _edit_workflow()
        workspace.workspace_write(project_name="site", agent=agent, changes=[
            workspace.Change(path="index.html", content=b"kept", fencing=lease.locks[0].fencing)])
        old = timezone.now() - workspace.COLLECT_GRACE - timedelta(minutes=1)
        Blob.objects.bulk_create([Blob(sha256=f"{i:064x}", size=1, data=b"x") for i in range(7)])
        Blob.objects.filter(sha256__startswith="0" * 60).update(created_at=old)
        Blob.objects.filter(sha256=workspace.sha256_of(b"kept")).update(created_at=old)
        Blob.objects.create(sha256="f" * 64, size=1, data=b"y")  # new: a write may be about to use it
        assert workspace.contents_collect(limit=3) == 7, "batches of 3 until none is left"
        assert set(Blob.objects.values_list("sha256", flat=True)) == {workspace.sha256_of(b"kept"), "f" * 64}
        assert tasks.collect_unused_contents() == 0
