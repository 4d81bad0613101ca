"""HTTP goes to Django, except `/mcp` (the MCP endpoint); WebSockets pass the origin check and session auth,
then the dashboard routes."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "am_project.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the apps loaded)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from coordination.mcp_server import MCPApp  # noqa: E402
from dashboard.routing import websocket_urlpatterns  # noqa: E402

mcp_app = MCPApp()


async def http(scope, receive, send):
    if scope["path"] == "/mcp" or scope["path"].startswith("/mcp/"):
        await mcp_app(scope, receive, send)
    else:
        await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
