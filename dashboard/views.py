from django.contrib.auth.decorators import login_required
from django.http import HttpRequest
from django.template.response import TemplateResponse

from coordination import selectors


@login_required
def overview(request: HttpRequest) -> TemplateResponse:
    return TemplateResponse(
        request,
        "dashboard/overview.html",
        {"workflows": selectors.workflow_list_recent(limit=50), "agents": selectors.agent_list()},
    )
