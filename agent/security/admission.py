"""Whether work that must be audited can be accepted now.

Nothing is done that cannot be recorded: a request that would be audited (any denial, any
allowed change, inference, audit reads) is refused with `AuditUnavailable` (503 +
Retry-After) while the audit writer's backlog is full, while the writer cannot write, or
while the home's filesystem has less free space than `security.audit_min_free_bytes`.
Free space is read with `statvfs` at most once a `cache_seconds`, not once per request.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import AuditUnavailable
from agent.security.audit import AuditLog

__all__ = ["AuditGate"]

log = logging.getLogger(__name__)
_MIB = 1024 * 1024


class AuditGate:
    """The one check before audited work; `refusal()` says why not, `check()` raises it."""

    def __init__(
        self,
        audit: AuditLog,
        home: Path,
        min_free_bytes: int,
        *,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._home = home
        self._min_free = min_free_bytes
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._free: int | None = None
        self._low = False

    @property
    def min_free_bytes(self) -> int:
        return self._min_free

    def free_bytes(self) -> int | None:
        """Bytes free for the daemon's user on the home's filesystem (cached); None if
        it cannot be read."""
        now = self._clock()
        with self._lock:
            if now - self._checked < self._cache_seconds:
                return self._free
            self._checked = now
        try:
            st = os.statvfs(self._home)
            free: int | None = st.f_bavail * st.f_frsize
        except OSError as exc:
            log.warning("cannot read the free space of %s: %s", self._home, exc.strerror)
            free = None
        self._free = free
        low = free is not None and free < self._min_free
        if low != self._low:
            self._low = low
            if low:
                log.error("%s: audited requests are refused", self._disk_reason(free or 0))
            else:
                log.warning("free disk space on %s is back above %.0f MiB: audited requests "
                            "are accepted again", self._home, self._min_free / _MIB)
        return free

    def _disk_reason(self, free: int) -> str:
        return (f"free disk space on {self._home} is {free / _MIB:.1f} MiB, below the "
                f"{self._min_free / _MIB:.0f} MiB watermark (security.audit_min_free_bytes)")

    def refusal(self) -> AuditUnavailable | None:
        """Why audited work must be refused now, or None."""
        free = self.free_bytes()
        if free is not None and free < self._min_free:
            return AuditUnavailable(f"{self._disk_reason(free)}; requests that must be audited "
                                    "are refused until space is freed", retry_after=60)
        return self._audit.refusing()

    def check(self) -> None:
        """Raise `AuditUnavailable` if audited work must be refused now."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
