"""Bearer tokens (agents' and people's API tokens) and lease tokens: made here, stored only as hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from coordination.errors import NotFound
from coordination.models import UserToken
from coordination.services import event_log

# A person's token's `last_used_at` is written at most this often.
USER_TOKEN_TOUCH_S = 60


def token_hash(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 pass is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def lease_token_for(attempt_id: UUID) -> str:
    """The lease token of an attempt: derived, so only its hash is stored yet a retried pull can get it again."""
    digest = hmac.new(settings.SECRET_KEY.encode(), f"am-lease:{attempt_id}".encode(), hashlib.sha256).digest()
    return "ls_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


@transaction.atomic
def user_token_create(*, user: AbstractBaseUser, name: str) -> str:
    """An API token acting as `user` (a script or pipeline); returned once, only its hash is stored."""
    token = new_token("amu")
    UserToken.objects.create(user=user, name=name[:100] or "token", token_hash=token_hash(token), token_prefix=token[:10])
    event_log.event_record(kind="user_token.created", data={"user": user.get_username(), "name": name})
    return token


def user_token_used(*, user_token: UserToken, now: datetime | None = None) -> None:
    """Record that a person's token was used; written at most every minute (no event: it is not a change)."""
    now = now or timezone.now()
    if user_token.last_used_at is None or (now - user_token.last_used_at).total_seconds() > USER_TOKEN_TOUCH_S:
        UserToken.objects.filter(id=user_token.id).update(last_used_at=now)
        user_token.last_used_at = now


@transaction.atomic
def user_token_revoke(*, token_id: UUID, user: AbstractBaseUser | None = None) -> None:
    """Delete a person's API token: it stops working at once."""
    token = UserToken.objects.select_for_update().select_related("user").filter(id=token_id).first()
    if token is None:
        raise NotFound(f"Token {token_id} does not exist.")
    token.delete()
    by = {"by_user": user.get_username()} if user is not None and user.is_authenticated else {}
    event_log.event_record(kind="user_token.revoked",
                           data={"user": token.user.get_username(), "name": token.name, **by})
