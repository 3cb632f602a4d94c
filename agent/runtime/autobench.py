"""The background benchmark: installed variants this hardware has no results for are
measured one at a time, at low priority, while the agent serves nothing.

A job of the daemon's scheduler (`autobench` in /agent/v1/jobs, one run at a time) looks
every `bench.auto_interval_seconds` for an unmeasured variant and measures it with
`agent.runtime.bench.bench_variants` in a child process at nice 19. It yields to requests:
it starts only while `busy()` is false, and a request arriving mid-measurement ends the
child (figures taken beside other work would be wrong); the variant is tried again on a
later tick. Results land in the registry, so the next selection uses them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.runtime.bench import Interrupted, bench_variants
from agent.runtime.resolver import ModelResolver

log = logging.getLogger(__name__)

NICE = 19


class AutoBench:
    """What the background job runs (`run_once`, in a worker thread); `stop()` ends it."""

    def __init__(self, resolver: ModelResolver, busy: Callable[[], bool]) -> None:
        self.resolver = resolver
        self.busy = busy
        self._stopping = threading.Event()

    def pending(self) -> list[tuple[str, str]]:
        """(alias, variant) of installed variants with no result on this hardware."""
        from registry.bench import results

        reg = self.resolver.registry
        hw = self.resolver.fingerprint()
        out = []
        for alias in reg.aliases():
            done = {r.variant for r in results(reg, alias, hw)}
            out += [(alias, s.name) for s in reg.variant_specs(alias)
                    if s.installed and s.name not in done]
        return out

    def run_once(self) -> list[str]:
        """Measure the unmeasured variants of the first model that has any, unless the
        agent is busy; returns what was measured (nothing when it yielded)."""
        if self.busy() or self._stopping.is_set():
            return []
        todo = self.pending()
        if not todo:
            return []
        alias = todo[0][0]
        names = {v for a, v in todo if a == alias}
        try:
            done = bench_variants(self.resolver, alias, names, nice=NICE,
                                  should_stop=lambda: self.busy() or self._stopping.is_set())
        except Interrupted as exc:
            log.info("background benchmark yielded: %s", exc)
            return []
        except Exception:
            log.exception("background benchmark of %s failed", alias)
            return []
        log.info("benchmarked %s: %s", alias, ", ".join(done))
        return done

    def stop(self) -> None:
        """End a measurement in progress (the child is stopped at its next check)."""
        self._stopping.set()
