"""WebSocket routes of the dashboard."""

from django.urls import path

from dashboard import consumers

websocket_urlpatterns = [
    path("ws/overview/", consumers.OverviewConsumer.as_asgi()),
    path("ws/workflows/<uuid:workflow_id>/", consumers.WorkflowConsumer.as_asgi()),
    path("ws/steps/<uuid:step_id>/", consumers.StepConsumer.as_asgi()),
    path("ws/projects/<slug:project>/", consumers.ProjectConsumer.as_asgi()),
    path("ws/projects/<slug:project>/files/<path:path>", consumers.ProjectConsumer.as_asgi()),
]
