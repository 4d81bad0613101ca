"""Projects: the namespace of one shared workspace (its file locks, its workflows)."""

from __future__ import annotations

from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from coordination.errors import Conflict, InvalidRequest, NotFound
from coordination.models import Agent, Project
from coordination.services import event_log
from coordination.services.workflow_counters import actor
from coordination.services.workflow_specs import PROJECT_RE

MAX_DESCRIPTION = 10_000


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or not PROJECT_RE.match(name):
        raise InvalidRequest(f"{name!r} is not a valid project name: use 1 to 64 letters, digits, '_' or '-'.")
    return name


def project_get_or_create(*, name: str) -> Project:
    """The named project, created (with its event) when missing; a concurrent creation is used as is."""
    project = Project.objects.filter(name=name).first()
    if project is not None:
        return project
    _checked_name(name)
    try:
        with transaction.atomic():
            project = Project.objects.create(name=name)
    except IntegrityError:
        # Created by a concurrent request in between: use theirs.
        return Project.objects.get(name=name)
    event_log.event_record(kind="project.created", data={"project": name})
    return project


@transaction.atomic
def project_create(*, name: str, description: str = "", user: AbstractBaseUser | None = None,
                   agent: Agent | None = None) -> Project:
    """A new project; refused when the name is taken or malformed."""
    _checked_name(name)
    if len(description) > MAX_DESCRIPTION:
        raise InvalidRequest(f"A description is at most {MAX_DESCRIPTION} characters.")
    if Project.objects.filter(name=name).exists():
        raise Conflict(f"A project named {name!r} exists already.")
    try:
        with transaction.atomic():
            project = Project.objects.create(name=name, description=description)
    except IntegrityError:
        raise Conflict(f"A project named {name!r} exists already.") from None
    event_log.event_record(kind="project.created", agent_id=agent.id if agent else None,
                           data={"project": name, **actor(user, agent)})
    return project


@transaction.atomic
def project_update(*, project_id: UUID, description: str, user: AbstractBaseUser | None = None) -> Project:
    """Change a project's description (its name is its identity in paths, APIs and locks: it stays)."""
    project = Project.objects.select_for_update().filter(id=project_id).first()
    if project is None:
        raise NotFound(f"Project {project_id} does not exist.")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidRequest(f"A description is at most {MAX_DESCRIPTION} characters.")
    if description != project.description:
        project.description = description
        project.save(update_fields=["description"])
        event_log.event_record(kind="project.updated",
                               data={"project": project.name, "changed": ["description"], **actor(user, None)})
    return project
