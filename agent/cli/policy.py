"""`edge-agent policy check | explain | reload`: the RBAC policy from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.cli.common import AgentGroup, Context, call, emit_json, json_option
from agent.errors import PolicyError
from agent.security.authz import (
    PERMISSIONS,
    Decision,
    RbacPolicy,
    authorize,
    check_policy,
    configured_policy_path,
    daemon_uid,
    load_policy,
)
from agent.security.identity import subject_for_uid

pass_ctx = click.make_pass_decorator(Context)


@click.group(cls=AgentGroup)
def policy() -> None:
    """Check, explain and reload the RBAC policy (who may do what)."""


@policy.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@json_option
def check(file: Path, as_json: bool) -> None:
    """Validate a policy file: every problem, one `file:line: field: why` line each.

    Exit 0 if the daemon would accept the file, 2 (a configuration error) if not, so a
    deployment tool can run it before installing a file (ansible's `validate`)."""
    try:
        pol, problems = check_policy(file)
        lines = [p.render(file) for p in problems]
    except PolicyError as exc:  # unreadable, not UTF-8, invalid YAML: one located line
        pol, problems, lines = None, [], [str(exc)]
    if as_json:
        emit_json({"file": str(file), "ok": not lines,
                   "problems": [{"line": p.line, "field": p.field, "message": p.message}
                                for p in problems] or
                               [{"line": None, "field": None, "message": m} for m in lines]})
    elif pol is not None and not lines:
        click.echo(f"{file}: ok ({len(pol.roles)} roles, {len(pol.bindings)} bindings)")
    for line in [] if as_json else lines:
        click.echo(line, err=True)
    if lines:
        if not as_json:
            click.echo(f"edge-agent: error: {file}: {len(lines)} "
                       f"problem{'s' if len(lines) != 1 else ''}", err=True)
        sys.exit(2)


@policy.command("explain")
@click.option("--uid", type=int, required=True, help="The uid to explain (a process of it).")
@click.option("--action", type=click.Choice(PERMISSIONS), default=None,
              help="One permission (default: every permission).")
@click.option("--model", default=None, help="Model alias, for model-scoped permissions.")
@click.option("--file", "file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Policy file (default: the one the daemon is configured with).")
@json_option
@pass_ctx
def explain(ctx: Context, uid: int, action: str | None, model: str | None, file: Path | None,
            as_json: bool) -> None:
    """Say whether a uid may perform an action, and which binding decides."""
    path = file or configured_policy_path(ctx.settings)
    pol: RbacPolicy = load_policy(path, self_uid=daemon_uid(ctx.settings.home))
    subject = subject_for_uid(uid)
    actions = [action] if action else list(PERMISSIONS)
    decisions: list[tuple[str, Decision]] = [
        (a, authorize(pol, subject, a, model)) for a in actions
    ]
    if as_json:
        emit_json({
            "subject": subject.display, "groups": sorted(subject.groups), "policy": str(path),
            "model": model,
            "decisions": [{"action": a, "allowed": d.allowed, "reason": d.reason,
                           "binding": d.binding, "role": d.role} for a, d in decisions],
        })
        return
    if action:
        click.echo(decisions[0][1].reason)
        return
    click.echo(f"{subject.display} groups: {', '.join(sorted(subject.groups)) or '-'}")
    width = max(len(a) for a in actions)
    for a, d in decisions:
        click.echo(f"{a:<{width}}  {d.reason}")


@policy.command("reload")
@pass_ctx
def reload(ctx: Context) -> None:
    """Make the running daemon re-read its policy; an invalid file is rejected."""
    r = call(ctx, "POST", "/agent/v1/policy/reload", timeout=30)
    click.echo(f"policy reloaded: {r['message']}")
