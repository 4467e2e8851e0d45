"""`rbee tenants ...`: the admin API of a running queen in platform mode."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import click

__all__ = ["tenants"]

DEFAULT_QUEEN = "http://127.0.0.1:7833"


class AdminError(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


def _call(ctx: click.Context, method: str, path: str, body: Any = None) -> Any:
    queen, token = ctx.obj["queen"], ctx.obj["token"]
    request = urllib.request.Request(
        queen.rstrip("/") + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise AdminError(f"{method} {path}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the queen at {queen}: {reason}") from None


def _show(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group()
@click.option("--queen", default=DEFAULT_QUEEN, show_default=True, help="The queen's URL.")
@click.pass_context
def tenants(ctx: click.Context, queen: str) -> None:
    """Manage the tenants of a queen in platform mode (token: RBEE_ADMIN_TOKEN)."""
    ctx.obj = {"queen": queen, "token": os.environ.get("RBEE_ADMIN_TOKEN", "")}


@tenants.command("add")
@click.argument("tenant_id")
@click.option("--name")
@click.option("--weight", type=float, default=1.0, show_default=True)
@click.option("--tokens-per-day", type=int)
@click.option("--max-concurrent", type=int)
@click.option("--requests-per-minute", type=int)
@click.option("--vram-bytes", type=int)
@click.pass_context
def add(ctx: click.Context, tenant_id: str, name: str | None, weight: float,
        tokens_per_day: int | None, max_concurrent: int | None,
        requests_per_minute: int | None, vram_bytes: int | None) -> None:
    """Create a tenant, or update one with the same id."""
    quota = {"tokens_per_day": tokens_per_day, "max_concurrent": max_concurrent,
             "requests_per_minute": requests_per_minute, "vram_bytes": vram_bytes}
    _show(_call(ctx, "POST", "/v1/tenants", {
        "id": tenant_id, "name": name or tenant_id, "weight": weight,
        "quota": {k: v for k, v in quota.items() if v is not None}}))


@tenants.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List tenants with their quotas and keys (ids only)."""
    _show(_call(ctx, "GET", "/v1/tenants"))


@tenants.command("issue-key")
@click.argument("tenant_id")
@click.pass_context
def issue_key(ctx: click.Context, tenant_id: str) -> None:
    """Issue an API key; it is shown this once and stored only as a hash."""
    _show(_call(ctx, "POST", f"/v1/tenants/{tenant_id}/keys"))


@tenants.command("revoke-key")
@click.argument("tenant_id")
@click.argument("key_id")
@click.pass_context
def revoke_key(ctx: click.Context, tenant_id: str, key_id: str) -> None:
    """Revoke one of a tenant's keys."""
    _show(_call(ctx, "DELETE", f"/v1/tenants/{tenant_id}/keys/{key_id}"))


@tenants.command("usage")
@click.argument("tenant_id")
@click.pass_context
def usage(ctx: click.Context, tenant_id: str) -> None:
    """Usage against quota, today and per day."""
    _show(_call(ctx, "GET", f"/v1/tenants/{tenant_id}/usage"))
