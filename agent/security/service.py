"""The device's access control in one object: the one holder of the policy in force, the
identity cache, the token verifier, the audit sink, and the one policy reload that SIGHUP,
the API and (through the API) the CLI all use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.security.admission import AuditGate
from agent.security.audit import AuditFn
from agent.security.authz import PolicyStore
from agent.security.denials import DenialSummaries
from agent.security.identity import IdentityCache, Subject
from agent.security.tokens import TokenInfo

log = logging.getLogger(__name__)


class TokenVerifier(Protocol):
    """What request authentication needs of `agent.security.tokens.TokenStore`."""

    async def averify(self, token: str, peer: str | None = None) -> TokenInfo: ...


@dataclass
class Security:
    """What every enforcement point (API middleware, CLI guard, signal handler) consults."""

    policy: PolicyStore
    tokens: TokenVerifier | None
    audit: AuditFn
    identities: IdentityCache = field(default_factory=IdentityCache)
    # Refuses audited work the log cannot take (None: always admit).
    gate: AuditGate | None = None
    # Repeated denials counted into summaries (None: every denial recorded in full).
    denials: DenialSummaries | None = None

    def admit(self) -> None:
        """Raise `AuditUnavailable` if work that must be audited cannot be accepted now."""
        if self.gate is not None:
            self.gate.check()

    def deny(self, peer: str, route: str, subject: Subject | str | None, action: str,
             resource: str, outcome: str, details: dict[str, Any]) -> None:
        """Audit a denial; repeats of a (peer, route, reason) are counted into a summary."""
        if self.denials is None:
            self.record(subject, action, resource, "deny", outcome, details)
            return
        try:
            self.denials.deny(peer, route, subject, action, resource, outcome, details)
        except Exception:
            log.exception("audit append failed for %s %s", action, resource)

    def record(self, subject: Subject | str | None, action: str, resource: str, decision: str,
               outcome: str, details: dict[str, Any]) -> None:
        """Audit one decision; never raises (a failing audit sink is logged)."""
        try:
            self.audit(subject, action, resource, decision, outcome, details)
        except Exception:
            log.exception("audit append failed for %s %s", action, resource)

    def reload_policy(self, by: Subject | str, path: Path | None = None) -> tuple[bool, str]:
        """Re-read the policy file (or take `path`, a deployed one); an invalid one keeps
        the old policy in force.

        Cached identities are dropped (group changes take effect with the new policy) and
        the attempt is audited as `by` (a subject, "signal:SIGHUP", "deploy:<name>")."""
        ok, message = self.policy.reload(path)
        if ok:
            self.identities.invalidate()
        self.record(by, "policy:write", f"policy:{self.policy.path}", "allow",
                    "ok" if ok else "rejected", {"message": message})
        return ok, message
