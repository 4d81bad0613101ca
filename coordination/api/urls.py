from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from coordination.api import views

app_name = "api"

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
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]
