from django.urls import path

from dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("workflows/<uuid:workflow_id>/", views.workflow_page, name="workflow"),
    path("workflows/<uuid:workflow_id>/<str:action>", views.workflow_action, name="workflow-action"),
    path("steps/<uuid:step_id>/", views.step_page, name="step"),
    path("steps/<uuid:step_id>/retry", views.step_retry, name="step-retry"),
    path("steps/<uuid:step_id>/decide", views.step_decide, name="step-decide"),
    path("agents/", views.agents_page, name="agents"),
    path("locks/", views.locks_page, name="locks"),
    path("locks/<uuid:lock_id>/release", views.lock_release, name="lock-release"),
    path("submit/", views.submit_page, name="submit"),
    path("projects/", views.projects_page, name="projects"),
    path("projects/<slug:project>/", views.project_page, name="project"),
    path("projects/<slug:project>/files/<path:path>", views.project_file_page, name="project-file"),
    path("projects/<slug:project>/download/<path:path>", views.project_file_download, name="project-download"),
    path("projects/<slug:project>/archive", views.project_archive, name="project-archive"),
]
