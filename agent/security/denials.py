"""Repeated denials recorded in summary form, so a flood of 401/403s cannot fill the disk.

The first denial of a (peer, route, reason) in a window is recorded in full, as before;
repeats within the window are only counted, and when the window closes (the next denial
after it, the periodic `sweep()`, or `flush()` at shutdown) one summary record says
"N more denials of ROUTE by SUBJECT between T1 and T2". Every denial is accounted for:
1 + the summaries' `count`. Bounds: a peer has at most `per_route` reasons open per
route (beyond, they share one "other reasons" window), and at most `max_windows` are open
in all (beyond, every window is closed early and summarised).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from agent.security.audit import AuditFn, format_time
from agent.security.identity import Subject

__all__ = ["OTHER_REASONS", "DenialSummaries"]

OTHER_REASONS: Final = "(other reasons)"
_Key = tuple[str, str, str]


@dataclass
class _Window:
    opened: float  # monotonic, for expiry
    subject: Subject | str | None
    action: str
    status: Any
    first: str  # wall-clock times of the first and last repeat
    last: str = ""
    count: int = 0  # repeats after the recorded first denial
    reasons: dict[str, int] = field(default_factory=dict)  # for the "other reasons" window


class DenialSummaries:
    """Counts repeated denials per (peer, route, reason); see the module docstring."""

    def __init__(
        self,
        record: AuditFn,
        window_seconds: float,
        *,
        per_route: int = 16,
        max_windows: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record = record
        self._window = window_seconds
        self._per_route = per_route
        self._max_windows = max_windows
        self._clock = clock
        self._lock = threading.Lock()
        self._open: OrderedDict[_Key, _Window] = OrderedDict()  # oldest first
        self._per: dict[tuple[str, str], int] = {}

    def deny(self, peer: str, route: str, subject: Subject | str | None, action: str,
             resource: str, outcome: str, details: dict[str, Any]) -> None:
        """Record this denial, or count it if its (peer, route, reason) was recorded within
        the window."""
        reason = str(details.get("reason", ""))
        now = self._clock()
        when = format_time(datetime.now(UTC))
        with self._lock:
            closed = self._expire(now)
            key = (peer, route, reason)
            win = self._open.get(key)
            if win is None and self._per.get((peer, route), 0) >= self._per_route:
                key = (peer, route, OTHER_REASONS)
                win = self._open.get(key)
            if win is not None:
                win.count += 1
                if win.count == 1:
                    win.first = when
                win.last = when
                if key[2] == OTHER_REASONS and (
                        reason in win.reasons or len(win.reasons) < self._per_route):
                    win.reasons[reason] = win.reasons.get(reason, 0) + 1
                first = False
            else:
                if len(self._open) >= self._max_windows:
                    closed += self._close_all()
                self._open[key] = _Window(now, subject, action, details.get("status"), when)
                self._per[(peer, route)] = self._per.get((peer, route), 0) + 1
                first = True
        self._emit(closed)
        if first:
            self._record(subject, action, resource, "deny", outcome, details)

    def sweep(self) -> int:
        """Summarise the windows that have closed; how many summaries were recorded."""
        with self._lock:
            closed = self._expire(self._clock())
        return self._emit(closed)

    def flush(self) -> int:
        """Summarise every open window now (shutdown); how many summaries were recorded."""
        with self._lock:
            closed = self._close_all()
        return self._emit(closed)

    @property
    def pending(self) -> int:
        """Denials counted but not yet recorded in a summary."""
        with self._lock:
            return sum(w.count for w in self._open.values())

    def _expire(self, now: float) -> list[tuple[_Key, _Window]]:
        closed: list[tuple[_Key, _Window]] = []
        while self._open:
            key, win = next(iter(self._open.items()))
            if now - win.opened < self._window:
                break  # windows open in order and are equally long: the rest are younger
            self._pop(key)
            closed.append((key, win))
        return closed

    def _close_all(self) -> list[tuple[_Key, _Window]]:
        closed = list(self._open.items())
        self._open.clear()
        self._per.clear()
        return closed

    def _pop(self, key: _Key) -> None:
        del self._open[key]
        left = self._per[key[:2]] - 1
        if left:
            self._per[key[:2]] = left
        else:
            del self._per[key[:2]]

    def _emit(self, closed: list[tuple[_Key, _Window]]) -> int:
        n = 0
        for (peer, route, reason), win in closed:
            if win.count == 0:
                continue
            who = win.subject.display if isinstance(win.subject, Subject) else (
                win.subject or peer)
            details: dict[str, Any] = {
                "summary": (f"{win.count} more denials of {route} by {who} between "
                            f"{win.first} and {win.last}"),
                "count": win.count, "first": win.first, "last": win.last, "peer": peer,
                "route": route, "reason": reason, "status": win.status,
            }
            if win.reasons:  # the shared window: which reasons, as far as it kept them
                details["reasons"] = win.reasons
                details["unlisted"] = win.count - sum(win.reasons.values())
            self._record(win.subject, win.action, f"route:{route}", "deny", "denied", details)
            n += 1
        return n
