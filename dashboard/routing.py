"""WebSocket routes of the dashboard (live updates arrive with the dashboard pages)."""

websocket_urlpatterns: list = []
