"""Where things live in the agent's state directory; the one place these paths are computed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DB_FILE = "registry.db"  # kept from the first release: existing devices open it in place


@dataclass(frozen=True, slots=True)
class StateDir:
    """The state directory (`home`) and the paths derived from it."""

    home: Path

    @property
    def db(self) -> Path:
        """The SQLite database every table lives in."""
        return self.home / DB_FILE

    @property
    def store(self) -> Path:
        """Content-addressed model blobs."""
        return self.home / "store"

    @property
    def registry_lock(self) -> Path:
        """`flock` that serialises registry changes across processes."""
        return self.home / "registry.lock"

    @property
    def policies(self) -> Path:
        """Policies a deployment installed (rbac.yaml, selection.yaml); they take the place
        of the packaged ones unless the settings name files explicitly."""
        return self.home / "policies"

    @property
    def downloads(self) -> Path:
        """Partial downloads of deployments, kept across restarts to resume."""
        return self.home / "downloads"

    @property
    def keys(self) -> Path:
        """Device keys (0700)."""
        return self.home / "keys"

    @property
    def audit_head(self) -> Path:
        """The audit chain's signed heads, recorded outside the database (0640)."""
        return self.home / "audit-head"
