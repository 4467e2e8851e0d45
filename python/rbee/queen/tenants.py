"""Tenants of platform mode: API keys, quotas and the usage ledger.

Keys are shown once and stored only as SHA-256 hashes of their secret part:
the secrets are 256 random bits, so a fast hash is as good as a slow one and
keeps authentication off the request's critical path. Comparison is
constant-time. Usage (tokens) is kept per tenant and UTC day in SQLite;
concurrency and request rate are counted in memory by the queen.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from rbee.queen.jobs import JobError

__all__ = ["Tenant", "Tenants", "utc_day", "ms_until_utc_midnight"]

QUOTA_KEYS = ("tokens_per_day", "max_concurrent", "requests_per_minute", "vram_bytes")
_KEY_PREFIX = "rbee"


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


def ms_until_utc_midnight(at: float | None = None) -> int:
    at = time.time() if at is None else at
    return int((86_400 - at % 86_400) * 1000) + 1


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(eq=False)
class Tenant:
    id: str
    name: str
    weight: float = 1.0
    quota: dict[str, int] = field(default_factory=dict)
    tokens_today: int = 0
    day: str = field(default_factory=utc_day)
    concurrent: int = 0
    vram_bytes: int = 0
    recent: collections.deque = field(default_factory=collections.deque)  # request times (s)

    def roll_day(self) -> None:
        today = utc_day()
        if today != self.day:
            self.day, self.tokens_today = today, 0

    def requests_last_minute(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        while self.recent and self.recent[0] <= now - 60:
            self.recent.popleft()
        return len(self.recent)

    def snapshot(self) -> dict[str, Any]:
        """The tenant as policies see it (DESIGN 2.2)."""
        self.roll_day()
        usage = {"tokens_today": self.tokens_today, "concurrent": self.concurrent,
                 "requests_last_minute": self.requests_last_minute(),
                 "vram_bytes": self.vram_bytes}
        return {"id": self.id, "name": self.name, "weight": self.weight,
                "quota": dict(self.quota), "usage": usage,
                "over_quota": self.exceeded() is not None}

    def exceeded(self) -> str | None:
        """The first quota the tenant has used up, if any."""
        self.roll_day()
        used = {"tokens_per_day": self.tokens_today, "max_concurrent": self.concurrent,
                "requests_per_minute": self.requests_last_minute(),
                "vram_bytes": self.vram_bytes}
        for key in QUOTA_KEYS:
            limit = self.quota.get(key)
            if limit is not None and used[key] >= limit:
                return key
        return None

    def retry_after_ms(self) -> int:
        """When the exhausted quota frees up."""
        kind = self.exceeded()
        if kind == "tokens_per_day":
            return ms_until_utc_midnight()
        if kind == "requests_per_minute" and self.recent:
            return max(1, int((self.recent[0] + 60 - time.time()) * 1000) + 1)
        return 1000  # concurrency and VRAM free up when a job ends: look again soon

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "weight": self.weight,
                "quota": dict(self.quota)}


class Tenants:
    """The tenants of one queen, backed by the store."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.by_id: dict[str, Tenant] = {}
        for row in store.tenants():
            self._load(row)

    def _load(self, row: dict[str, Any]) -> Tenant:
        tenant = self.by_id.get(row["id"]) or Tenant(id=row["id"], name=row["name"])
        tenant.name, tenant.weight = row["name"], float(row["weight"])
        tenant.quota = {k: int(v) for k, v in (row.get("quota") or {}).items()
                        if k in QUOTA_KEYS and v is not None}
        tenant.tokens_today = self.store.tokens_used(tenant.id, utc_day())
        self.by_id[tenant.id] = tenant
        return tenant

    def upsert(self, spec: dict[str, Any]) -> Tenant:
        tenant_id = spec.get("id")
        if not isinstance(tenant_id, str) or not tenant_id.strip():
            raise ValueError("'id' must be a non-empty string")
        unknown = set(spec) - {"id", "name", "weight", "quota"}
        if unknown:
            raise ValueError(f"unknown tenant field(s): {', '.join(sorted(unknown))}")
        weight = spec.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"'weight' must be a positive number, got {weight!r}")
        quota = spec.get("quota") or {}
        if not isinstance(quota, dict):
            raise ValueError("'quota' must be an object")
        for key, value in quota.items():
            if key not in QUOTA_KEYS:
                raise ValueError(f"quota.{key}: unknown quota (known: {', '.join(QUOTA_KEYS)})")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"quota.{key}: expected a non-negative integer, got {value!r}")
        row = {"id": tenant_id, "name": spec.get("name") or tenant_id, "weight": weight,
               "quota": {k: v for k, v in quota.items() if v is not None}}
        self.store.save_tenant(row)
        return self._load(row)

    # -- keys ------------------------------------------------------------------

    def issue_key(self, tenant_id: str) -> dict[str, str]:
        if tenant_id not in self.by_id:
            raise KeyError(tenant_id)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        self.store.save_key(key_id, tenant_id, _hash(secret))
        return {"key_id": key_id, "key": f"{_KEY_PREFIX}_{key_id}_{secret}",
                "tenant_id": tenant_id}

    def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        return self.store.revoke_key(tenant_id, key_id)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant whose key is in the Authorization header, or 401."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise JobError(401, "missing_api_key",
                           "send your API key as 'Authorization: Bearer <key>'",
                           kind="authentication_error")
        prefix, _, rest = key.strip().partition("_")
        key_id, _, secret = rest.partition("_")
        stored = self.store.key(key_id) if prefix == _KEY_PREFIX and key_id else None
        # Compare even when the key id is unknown, so timing does not tell.
        expected = stored["hash"] if stored else _hash("")
        valid = hmac.compare_digest(_hash(secret), expected) and stored is not None
        if not valid or stored["revoked_at"] is not None:
            raise JobError(401, "invalid_api_key", "the API key is not valid",
                           kind="authentication_error")
        tenant = self.by_id.get(stored["tenant_id"])
        if tenant is None:
            raise JobError(401, "invalid_api_key", "the API key's tenant no longer exists",
                           kind="authentication_error")
        return tenant

    # -- usage -----------------------------------------------------------------

    def record_tokens(self, tenant: Tenant, tokens: int) -> None:
        if tokens <= 0:
            return
        tenant.roll_day()
        tenant.tokens_today += tokens
        self.store.add_usage(tenant.id, tenant.day, tokens)

    def usage_report(self, tenant: Tenant, days: int = 30) -> dict[str, Any]:
        snap = tenant.snapshot()
        return {"tenant_id": tenant.id, "day": tenant.day, "quota": snap["quota"],
                "usage": snap["usage"], "over_quota": snap["over_quota"],
                "history": self.store.usage_history(tenant.id, days)}
