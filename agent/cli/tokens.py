"""`edge-agent tokens create | list | revoke`: API bearer tokens in the registry database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import click

from agent.cli.common import (
    AgentGroup,
    Context,
    database,
    emit_json,
    fail,
    json_option,
    print_rows,
)
from agent.cli.guard import guarded
from agent.security.authz import configured_policy_path, load_policy
from agent.security.tokens import TokenInfo, TokenStore, parse_duration

pass_ctx = click.make_pass_decorator(Context)


@contextmanager
def _store(ctx: Context, *, create: bool = False) -> Iterator[TokenStore]:
    """The token table of the configured home; only `create` makes a home (issue 15:
    commands that only read or revoke leave no state behind)."""
    with database(ctx, create=create) as db:
        yield TokenStore(db)


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group(cls=AgentGroup)
def tokens() -> None:
    """Create, list and revoke API bearer tokens (for TCP and containerised callers)."""


@tokens.command("create")
@click.option("--name", required=True, help="Unique name; audited as token:NAME.")
@click.option("--role", required=True, help="Role from the RBAC policy (e.g. app, viewer).")
@click.option("--expires", callback=_duration, default=None,
              help="Lifetime such as 30d, 12h, 90m (default: never expires).")
@json_option
@pass_ctx
@guarded("tokens:manage", resource=lambda kw: f"token:{kw['name']}")
def create(ctx: Context, name: str, role: str, expires: timedelta | None, as_json: bool) -> None:
    """Create a token and print it once; only a hash of its secret is kept."""
    path = configured_policy_path(ctx.settings)
    roles = load_policy(path).roles
    if role not in roles:
        fail(f"unknown role {role!r}; {path} defines: {', '.join(sorted(roles))}", 2)
    with _store(ctx, create=True) as store:
        token, info = store.create(name, role, expires)
    if as_json:
        emit_json({**info.as_json(datetime.now(UTC)), "token": token})
        return
    until = info.expires_at.isoformat(timespec="seconds") if info.expires_at else "never"
    click.echo(f"created token {name} (role {role}, expires {until}); it is shown only once:",
               err=True)
    click.echo(token)


@tokens.command("list")
@json_option
@pass_ctx
@guarded("tokens:manage")
def list_(ctx: Context, as_json: bool) -> None:
    """List tokens: name, role, status and dates (never secrets)."""
    if ctx.settings.state.db.is_file():
        with _store(ctx) as store:
            rows = store.list_tokens()
    else:  # no home yet: no tokens, and nothing created to say so
        rows = []
    now = datetime.now(UTC)

    def line(r: TokenInfo) -> str:
        created = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
        expires = r.expires_at.strftime("%Y-%m-%d %H:%M:%S") if r.expires_at else "never"
        return f"{r.name:<24} {r.role:<12} {r.status(now):<8} {created:<20} {expires}"

    print_rows([r.as_json(now) for r in rows], as_json, rows, line, empty="no tokens",
               header=f"{'NAME':<24} {'ROLE':<12} {'STATUS':<8} {'CREATED':<20} EXPIRES")


@tokens.command("revoke")
@click.argument("name")
@pass_ctx
@guarded("tokens:manage", resource=lambda kw: f"token:{kw['name']}")
def revoke(ctx: Context, name: str) -> None:
    """Revoke a token; the daemon refuses it from its next request on."""
    with _store(ctx) as store:
        info = store.revoke(name)
    assert info.revoked_at is not None
    click.echo(f"revoked token {name} at {info.revoked_at.isoformat(timespec='seconds')}")
