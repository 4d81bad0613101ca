"""Agents: registration, tokens, roles and capacity, enabling, and their presence."""

from __future__ import annotations

import re
from datetime import datetime
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from coordination import agent_cache
from coordination.errors import Forbidden, InvalidRequest, NotFound
from coordination.models import ROLE_PATTERN, Agent
from coordination.services import event_log, tokens
from coordination.services.workflow_counters import actor

_ROLE_RE = re.compile(ROLE_PATTERN)
HUMAN_ROLE = "human"
# An agent's `last_seen_at` is written at most this often.
AGENT_SEEN_TOUCH_S = 5


def parse_roles(raw: str | list[str], *, registering: bool = True) -> list[str]:
    """Roles from "a,b" or a list: slugs, de-duplicated, order kept; raise InvalidRequest otherwise.

    One rule for every caller: agent registration, the REST pull and the MCP tools.
    `registering=False` (a pull, a listing) lets `human` through as a slug; holding
    it is `check_roles`'s question.
    """
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    roles: list[str] = []
    for item in items:
        role = item.strip() if isinstance(item, str) else item
        if not isinstance(role, str) or not _ROLE_RE.match(role):
            raise InvalidRequest(
                f"{role!r} is not a valid role: use a slug of a-z, 0-9, '_' and '-' (1 to 64 characters)."
            )
        if registering and role == HUMAN_ROLE:
            raise InvalidRequest("The 'human' role is for approval steps that people decide in the dashboard.")
        if role not in roles:
            roles.append(role)
    if not roles:
        raise InvalidRequest("Give at least one role.")
    return roles


def check_roles(agent: Agent, roles: list[str]) -> None:
    """Refuse (403) roles the agent does not hold."""
    missing = [role for role in roles if role not in agent.roles]
    if missing:
        raise Forbidden(
            f"Agent {agent.name!r} does not hold role(s) {', '.join(missing)}; it holds {', '.join(agent.roles) or 'none'}. "
            "Use only your roles, or give the agent the role in the admin.",
            roles=missing,
        )


def _validated(*, name: str, roles: list[str], capacity: int) -> tuple[str, list[str]]:
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequest("An agent name must be 1 to 100 characters.")
    if not isinstance(capacity, int) or capacity < 1 or capacity > 1000:
        raise InvalidRequest(f"Capacity must be at least 1 (and at most 1000), not {capacity!r}.")
    return name, parse_roles(roles)


@transaction.atomic
def agent_create(
    *, name: str, roles: list[str], capacity: int = 1, can_submit: bool = False
) -> tuple[Agent, str]:
    """Register an agent; return it with its bearer token, which is not stored and cannot be shown again."""
    name, roles = _validated(name=name, roles=roles, capacity=capacity)
    if Agent.objects.filter(name=name).exists():
        raise InvalidRequest(f"An agent named {name!r} exists already: choose another name.")
    token = tokens.new_token("am")
    agent = Agent.objects.create(
        name=name,
        roles=roles,
        capacity=capacity,
        can_submit=can_submit,
        token_hash=tokens.token_hash(token),
        token_prefix=token[:10],
    )
    event_log.event_record(kind="agent.created", agent_id=agent.id, data={"name": name, "roles": roles})
    return agent, token


@transaction.atomic
def agent_rotate_token(*, agent: Agent) -> str:
    """Give an agent a new token; returned once, only its hash is stored.

    The old one stops working at once in this process, and in the others when they are notified of the commit.
    """
    token = tokens.new_token("am")
    Agent.objects.filter(id=agent.id).update(token_hash=tokens.token_hash(token), token_prefix=token[:10])
    agent_cache.agent_changed(agent.id)
    event_log.event_record(kind="agent.token_rotated", agent_id=agent.id, data={"name": agent.name})
    return token


@transaction.atomic
def agent_ensure(*, name: str, roles: list[str], capacity: int = 1) -> tuple[Agent, str]:
    """The named agent with these roles (created, or updated), and a fresh token for it."""
    agent = Agent.objects.select_for_update().filter(name=name).first()
    if agent is None:
        return agent_create(name=name, roles=roles, capacity=capacity)
    agent_update(agent_id=agent.id, name=name, roles=roles, capacity=capacity, can_submit=agent.can_submit,
                 enabled=True)
    agent.refresh_from_db()
    return agent, agent_rotate_token(agent=agent)


@transaction.atomic
def agent_update(*, agent_id: UUID, name: str, roles: list[str], capacity: int, can_submit: bool, enabled: bool,
                 user: AbstractBaseUser | None = None) -> Agent:
    """Change an agent's name, roles, capacity and rights (the admin's form); records `agent.updated`.

    Steps it holds stay its own: a role taken away or a lower capacity applies to its next pulls.
    """
    agent = Agent.objects.select_for_update().filter(id=agent_id).first()
    if agent is None:
        raise NotFound(f"Agent {agent_id} does not exist.")
    name, roles = _validated(name=name, roles=roles, capacity=capacity)
    if name != agent.name and Agent.objects.filter(name=name).exists():
        raise InvalidRequest(f"An agent named {name!r} exists already: choose another name.")
    new = {"name": name, "roles": roles, "capacity": capacity, "can_submit": bool(can_submit),
           "enabled": bool(enabled)}
    changed = {field: value for field, value in new.items() if getattr(agent, field) != value}
    if not changed:
        return agent
    for field, value in changed.items():
        setattr(agent, field, value)
    agent.save(update_fields=list(changed))
    agent_cache.agent_changed(agent.id)
    event_log.event_record(kind="agent.updated", agent_id=agent.id,
                           data={"name": agent.name, "changed": changed, **actor(user, None)})
    return agent


def agent_seen(*, agent: Agent, now: datetime | None = None) -> None:
    """Record that an agent called the API; written at most every few seconds per agent (no event)."""
    now = now or timezone.now()
    if agent.last_seen_at is None or (now - agent.last_seen_at).total_seconds() >= AGENT_SEEN_TOUCH_S:
        Agent.objects.filter(id=agent.id).update(last_seen_at=now)
        agent.last_seen_at = now
        agent_cache.cache.seen(token_hash=agent.token_hash, at=now)


@transaction.atomic
def agent_set_enabled(*, agent_id: UUID, enabled: bool, user: AbstractBaseUser | None = None) -> Agent:
    """Disable an agent (its token stops working: 401, at once in this process, in the others when they are
    notified of the commit) or enable it again."""
    agent = Agent.objects.select_for_update().filter(id=agent_id).first()
    if agent is None:
        raise NotFound(f"Agent {agent_id} does not exist.")
    if agent.enabled != enabled:
        agent.enabled = enabled
        agent.save(update_fields=["enabled"])
        agent_cache.agent_changed(agent.id)
        event_log.event_record(kind="agent.enabled" if enabled else "agent.disabled", agent_id=agent.id,
                               data={"name": agent.name, **actor(user, None)})
    return agent
