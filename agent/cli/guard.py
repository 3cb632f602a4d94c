"""RBAC and audit for CLI commands: the same policy and audit log as the socket API.

A state-changing or sensitive command declares its permission with `@guarded(...)`; the
invoking uid (from the kernel: `os.getuid()`) is authorized against the RBAC policy and
the decision and outcome are appended to the audit log, exactly as the API does.

The guard runs in the caller's own process, so it is advisory against a caller who can
write the database or choose the policy file (docs/security.md); the daemon's API is the
enforcement that holds against any local user.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import click

from agent.cli.common import Context, fail
from agent.security.audit import AuditEntry, AuditLog, audit_entry
from agent.security.authz import authorize, enforced_policy
from agent.security.identity import subject_for_uid
from agent.security.keys import load_or_create_device_key
from localdb import open_database

F = TypeVar("F", bound=Callable[..., Any])
PERMISSION_ATTR = "__edge_permission__"


def _audit(ctx: Context, entry: AuditEntry) -> None:
    state = ctx.settings.state
    if not state.db.exists():
        return  # an uninitialised device: nothing happened that the log could anchor to
    try:
        db = open_database(state.db)
        key = load_or_create_device_key(state.home)
    except Exception as exc:  # a caller without access is still refused, just unaudited
        click.echo(f"edge-agent: warning: could not write the audit record: {exc}", err=True)
        return
    try:
        log = AuditLog(db, key, checkpoint_on_close=False, head_file=state.audit_head)
        log.append(entry)
        log.close()  # flushes: the record is durable before the command returns
    finally:
        db.close()


def guarded(
    permission: str,
    *,
    resource: Callable[[dict[str, Any]], str] | None = None,
) -> Callable[[F], F]:
    """Authorize the calling uid for `permission`, then audit the decision and outcome."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context().find_object(Context)
            assert ctx is not None
            subject = replace(subject_for_uid(os.getuid()), pid=os.getpid())
            policy = enforced_policy(ctx.settings)
            command = click.get_current_context().command_path
            what = resource(kwargs) if resource else f"cli:{command}"
            decision = authorize(policy, subject, permission)

            def record(verdict: str, outcome: str, **details: Any) -> None:
                _audit(ctx, audit_entry(subject, permission, what, verdict, outcome,
                                        {"via": "cli", **details}))

            if not decision.allowed:
                record("deny", "denied", reason=decision.reason)
                fail(f"permission denied: {decision.reason}")
            try:
                result = fn(*args, **kwargs)
            except SystemExit as exc:
                record("allow", "ok" if exc.code in (0, None) else "error")
                raise
            except BaseException:
                record("allow", "error")
                raise
            record("allow", "ok")
            return result

        setattr(wrapper, PERMISSION_ATTR, permission)
        return wrapper  # type: ignore[return-value]

    return decorate
