"""The background benchmark job: measures what this hardware has not measured, only while
the agent is idle, and yields (stores nothing) when requests arrive mid-measurement."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.autobench import AutoBench
from agent.runtime.resolver import ModelResolver
from agent.settings import load_settings
from registry.bench import results
from registry.service import Registry, open_registry

pytestmark = pytest.mark.slow

ALIAS = "minilm-l6-v2"


@pytest.fixture
def resolver(tmp_path: Path) -> Iterator[ModelResolver]:
    settings = load_settings(environ={"EDGE_AGENT_HOME": str(tmp_path),
                                      "EDGE_AGENT_BENCH__EMBEDDING_INPUTS": "8",
                                      "EDGE_AGENT_RUNTIME__THREADS": "2"})
    reg: Registry = open_registry(settings.state)
    reg.pull(ALIAS)
    yield ModelResolver(settings, reg)
    reg.close()


def stored(resolver: ModelResolver) -> set[str]:
    return {r.variant for r in results(resolver.registry, ALIAS, resolver.fingerprint())}


def test_an_idle_agent_measures_new_variants_once(resolver: ModelResolver) -> None:
    job = AutoBench(resolver, busy=lambda: False)
    assert job.pending() == [(ALIAS, "onnx-int8-cpu")]
    assert job.run_once() == ["onnx-int8-cpu"]
    assert stored(resolver) == {"onnx-int8-cpu"}
    assert job.pending() == [] and job.run_once() == []
    row = results(resolver.registry, ALIAS)[0]
    assert row.measured.embeddings_per_second and row.measured.agreement == pytest.approx(1.0)


def test_a_busy_agent_is_not_disturbed(resolver: ModelResolver) -> None:
    assert AutoBench(resolver, busy=lambda: True).run_once() == []
    assert stored(resolver) == set()


def test_requests_arriving_mid_measurement_stop_it_and_nothing_is_stored(
    resolver: ModelResolver,
) -> None:
    calls = []

    def busy() -> bool:  # idle when the job starts, busy at the first check while measuring
        calls.append(1)
        return len(calls) > 1

    job = AutoBench(resolver, busy=busy)
    assert job.run_once() == []
    assert len(calls) >= 2 and stored(resolver) == set()
    assert job.pending() == [(ALIAS, "onnx-int8-cpu")]  # tried again on a later tick


def test_a_stopped_job_measures_nothing(resolver: ModelResolver) -> None:
    job = AutoBench(resolver, busy=lambda: False)
    job.stop()
    job.stop()  # safe twice
    assert job.run_once() == [] and stored(resolver) == set()


def test_the_daemon_runs_it_as_a_named_job_and_stops_cleanly(tmp_path: Path) -> None:
    from daemon import Daemon

    d = Daemon(tmp_path / "home", {"EDGE_AGENT_BENCH__AUTO": "true",
                                   "EDGE_AGENT_BENCH__AUTO_INTERVAL_SECONDS": "3600"}).start()
    try:
        with d.client() as c:
            jobs = {j["id"]: j for j in c.get("/agent/v1/jobs").json()["jobs"]}
        assert jobs["autobench"]["every_seconds"] == 3600 and jobs["autobench"]["next_run"]
    finally:
        d.stop()
    assert d.proc is not None and d.proc.returncode == 0
