from django.urls import path, register_converter
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from coordination.api import views, workspace_views

app_name = "api"


class AnyPathConverter:
    """Any workspace path, control characters included, so that they are refused as `invalid_path`, not 404."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(AnyPathConverter, "anypath")

urlpatterns = [
    path("tasks/<str:role>/ready", views.PullView.as_view(), name="pull"),
    path("steps/<uuid:step_id>", views.StepDetailView.as_view(), name="step"),
    path("steps/<uuid:step_id>/heartbeat", views.HeartbeatView.as_view(), name="heartbeat"),
    path("steps/<uuid:step_id>/release", views.ReleaseView.as_view(), name="release"),
    path("steps/<uuid:step_id>/retry", views.StepRetryView.as_view(), name="retry"),
    path("report_result", views.ReportView.as_view(), name="report"),
    path("workflows", views.WorkflowListView.as_view(), name="workflows"),
    path("workflows/<uuid:workflow_id>", views.WorkflowDetailView.as_view(), name="workflow"),
    path("workflows/<uuid:workflow_id>/status", views.WorkflowStatusView.as_view(), name="workflow-status"),
    path("workflows/<uuid:workflow_id>/cancel", views.WorkflowCancelView.as_view(), name="workflow-cancel"),
    path("workflows/<uuid:workflow_id>/pause", views.WorkflowPauseView.as_view(), name="workflow-pause"),
    path("workflows/<uuid:workflow_id>/resume", views.WorkflowResumeView.as_view(), name="workflow-resume"),
    path("workflows/<uuid:workflow_id>/events", views.WorkflowEventsView.as_view(), name="workflow-events"),
    path("workflows/<uuid:workflow_id>/audits", views.WorkflowAuditsView.as_view(), name="workflow-audits"),
    path("locks", views.LockListView.as_view(), name="locks"),
    path("locks/<uuid:lock_id>", views.LockDetailView.as_view(), name="lock"),
    path("locks/<uuid:lock_id>/renew", views.LockRenewView.as_view(), name="lock-renew"),
    path("agents", views.AgentListView.as_view(), name="agents"),
    path("agents/me", views.AgentMeView.as_view(), name="agent-me"),
    path("projects", workspace_views.ProjectListView.as_view(), name="projects"),
    path("projects/<slug:project>", workspace_views.ProjectDetailView.as_view(), name="project"),
    path("projects/<slug:project>/files", workspace_views.FilesView.as_view(), name="files"),
    # A history route before the file route: `files/a.py/history` is the history of `a.py`.
    path("projects/<slug:project>/files/<anypath:path>/history", workspace_views.FileHistoryView.as_view(),
         name="file-history"),
    path("projects/<slug:project>/files/<anypath:path>", workspace_views.FileView.as_view(), name="file"),
    path("projects/<slug:project>/changes", workspace_views.ChangesView.as_view(), name="changes"),
    path("projects/<slug:project>/archive", workspace_views.ArchiveView.as_view(), name="archive"),
    path("steps/<uuid:step_id>/changes", workspace_views.StepChangesView.as_view(), name="step-changes"),
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]
