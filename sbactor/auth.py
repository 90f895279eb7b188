"""Virtual keys: a client presents a key, the gateway knows only its SHA-256 and the principal."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import attrs


@attrs.frozen
class Principal:
    """Who is asking; travels with the request into every later stage (never the key itself)."""

    key_id: str | None = None
    user: str | None = None
    team: str | None = None
    tier: str = "default"
    tags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "user": self.user,
            "team": self.team,
            "tier": self.tier,
            "tags": list(self.tags),
        }


ANONYMOUS = Principal(key_id=None, user=None, team=None, tier="default", tags=())


@attrs.frozen
class KeyStore:
    """Maps SHA-256(key) to a principal. Hash lookup means the raw key is never stored or logged."""

    by_hash: Mapping[str, Principal]
    required: bool = True

    @classmethod
    def from_config(cls, keys: Iterable[Any], *, required: bool) -> KeyStore:
        return cls(
            {k.key_sha256: Principal(k.id, k.user, k.team, k.tier, tuple(k.tags)) for k in keys},
            required,
        )

    def authenticate(self, authorization: str | None, x_api_key: str | None) -> Principal | None:
        """The principal for the presented key, ANONYMOUS when auth is off, None when refused."""
        if not self.required:
            return ANONYMOUS
        key = _presented_key(authorization, x_api_key)
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        principal = self.by_hash.get(digest)
        if principal is None:
            return None
        return principal


def _presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key:
        return x_api_key.strip()
    return None


def admin_key_ok(
    configured: str | None, authorization: str | None, x_admin_key: str | None
) -> bool:
    """Constant-time check of the admin key; no key configured means the admin API is open."""
    if not configured:
        return True
    presented = _presented_key(authorization, x_admin_key) or ""
    return hmac.compare_digest(presented.encode(), configured.encode())


def new_key() -> tuple[str, str]:
    """A fresh virtual key and the SHA-256 to put in the config."""
    key = "sk-sb-" + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()
