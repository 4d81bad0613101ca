"""Who is calling: an agent (bearer token), or a user (bearer token or session).

Tokens are looked up by their SHA-256 and compared in constant time; a wrong
token, or a disabled agent's, is `401`. `request.auth` is the `Agent` for agent
tokens, so views can tell the two kinds of caller apart.

Agents are found through the per-process cache of `coordination/agent_cache.py`
(a change to an agent reaches it by NOTIFY, and at once in the process that
made it), so most agent requests read no agent row. User tokens are read from
the database every time.
"""

import hmac

from django.db import connection
from rest_framework import authentication, exceptions, permissions

from coordination import agent_cache, rows
from coordination.services import agent_registry, tokens
from coordination.models import Agent, UserToken


class AgentUser:
    """`request.user` for an agent: authenticated, never staff, never a Django user."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.pk = None

    def get_username(self) -> str:
        return f"agent:{self.agent.name}"

    def __str__(self) -> str:
        return self.get_username()


# Plain SQL: every agent request the cache cannot answer asks, and the ORM would compile the query each time.
AGENT_BY_TOKEN_SQL = f"SELECT {rows.select_list(Agent, 'a')} FROM coordination_agent a WHERE a.token_hash = %(hash)s"


def agent_by_token_hash(hashed: str) -> Agent | None:
    """The agent with this token hash (a copy of its own for the caller), from the cache when it can be trusted."""
    return agent_cache.read_through(hashed, _agent_from_database)


def _agent_from_database(hashed: str) -> Agent | None:
    with connection.cursor() as cursor:
        cursor.execute(AGENT_BY_TOKEN_SQL, {"hash": hashed})
        row = rows.fetch_named(cursor)
    return rows.from_named(Agent, row, "a") if row is not None else None


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header:
            return None
        if header[0].lower() != self.keyword.lower().encode():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <token>'.")
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header: use 'Bearer <token>' with one token.")
        try:
            token = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("The token contains characters a token never has.") from None
        hashed = tokens.token_hash(token)
        agent = agent_by_token_hash(hashed)
        if agent is not None and hmac.compare_digest(agent.token_hash, hashed):
            if not agent.enabled:
                raise exceptions.AuthenticationFailed(f"Agent {agent.name!r} is disabled; ask an administrator to enable it.")
            agent_registry.agent_seen(agent=agent)
            return AgentUser(agent), agent
        user_token = UserToken.objects.select_related("user").filter(token_hash=hashed).first()
        if user_token is not None and hmac.compare_digest(user_token.token_hash, hashed):
            if not user_token.user.is_active:
                raise exceptions.AuthenticationFailed("This token's user is inactive.")
            tokens.user_token_used(user_token=user_token)
            return user_token.user, user_token
        raise exceptions.AuthenticationFailed("Unknown token: check the value, or create a new agent token.")

    def authenticate_header(self, request):
        return self.keyword


class SessionAuthentication(authentication.SessionAuthentication):
    """Django session login (the dashboard's), with CSRF enforced on writes."""


def request_agent(request) -> Agent | None:
    return request.auth if isinstance(request.auth, Agent) else None


class IsAgent(permissions.BasePermission):
    message = "Only an agent token may do this: workers pull, heartbeat and report with their own token."

    def has_permission(self, request, view):
        return request_agent(request) is not None


class IsAuthenticated(permissions.BasePermission):
    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated)


class CanSubmit(permissions.BasePermission):
    """Users, and agents created with --can-submit, may create and control workflows."""

    message = "This agent may not create or control workflows; create it with --can-submit, or use a user's token."

    def has_permission(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        agent = request_agent(request)
        if agent is not None:
            return agent.can_submit
        return bool(request.user and request.user.is_authenticated)
