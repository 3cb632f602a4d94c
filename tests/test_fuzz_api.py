"""Schemathesis against the live daemon: every operation of docs/openapi.json, as an admin
(root's uid) and as an app (an API token with role app), with valid and invalid data.

Checks per request: no 5xx, a documented status, content type and body schema, answered
within TIMEOUT (no hang); after each identity's run the daemon is alive and ready.
Generation runs the real model: token counts are capped so a case costs milliseconds.

EDGE_TEST_FUZZ_EXAMPLES (default 3) is the examples per operation, per generation mode
(valid and invalid), per identity (a quarter of that for the routes without /v1, the same
handlers as their /v1 twins); EDGE_TEST_FUZZ_SEED picks another seed (default 0).
A long run: EDGE_TEST_FUZZ_EXAMPLES=500 EDGE_TEST_FUZZ_SEED=$RANDOM pytest tests/test_fuzz_api.py
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from daemon import Daemon, prepare_home, running
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent.security.tokens import TokenStore
from localdb import open_database

DOC = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
EXAMPLES = int(os.environ.get("EDGE_TEST_FUZZ_EXAMPLES", "3"))
SEED = int(os.environ.get("EDGE_TEST_FUZZ_SEED", "0"))
TIMEOUT = 30.0  # per request: a generation of a few tokens takes well under a second
SMOL = "smollm2-135m"
MAX_TOKENS = 3
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
TEXT_FIELDS = ("messages", "prompt", "input", "instructions")
TEXT_CHARS = 64
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass
class Stats:
    identity: str
    cases: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    unsendable: int = 0  # negative cases httpx refuses to put on the wire (bad header bytes)

    def line(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items()))
        modes = ", ".join(f"{k} {v}" for k, v in sorted(self.modes.items()))
        return (f"fuzz[{self.identity}]: {self.cases} cases ({modes}), {len(self.failures)} "
                f"failures, {self.unsendable} unsendable; statuses {{{codes}}}")


@dataclass
class Fuzzed:
    daemon: Daemon
    app_token: str


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[Fuzzed]:
    home = prepare_home(tmp_path_factory.mktemp("home"), {SMOL: smollm2_gguf})
    db = open_database(home / "registry.db")
    store = TokenStore(db)
    try:
        token, _ = store.create("fuzz-app", "app")
    finally:
        store.close()
        db.close()
    with running(home) as d:
        yield Fuzzed(d, token)


def _bounded(case: schemathesis.Case, positive: bool) -> None:
    """Keep generation cheap and make valid cases reach the model: the real alias for a
    model that the generator named at random, a few tokens at most."""
    body = case.body
    if isinstance(body, dict):
        for name in TOKEN_FIELDS:
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[name] = MAX_TOKENS
        if positive and "model" in body:
            body["model"] = SMOL
        if positive and isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if positive:
            for name in TEXT_FIELDS:
                if name in body:
                    body[name] = _clipped(body[name])
        path = case.operation.path
        wanted = ("max_output_tokens" if path.endswith("/responses")
                  else "max_completion_tokens" if path.endswith("/chat/completions")
                  else "max_tokens" if path.endswith("/completions") else None)
        if positive and wanted is not None:
            # A keep_alive of 0 s unloads the model after the request, and each reload costs
            # seconds: the load route's own cases cover keep_alive with the real model.
            body.pop("keep_alive", None)
        if wanted is not None and not any(
                isinstance(body.get(name), int) for name in TOKEN_FIELDS):
            body[wanted] = MAX_TOKENS
    params = case.path_parameters
    if positive and params and "alias" in params:
        params["alias"] = SMOL


def _clipped(value: Any) -> Any:
    """Texts cut to TEXT_CHARS (a prompt of random kilobytes costs seconds to evaluate)."""
    if isinstance(value, str):
        return value[:TEXT_CHARS]
    if isinstance(value, list):
        return [_clipped(v) for v in value]
    if isinstance(value, dict):
        return {k: _clipped(v) for k, v in value.items()}
    return value


def _send(client: httpx.Client, case: schemathesis.Case,
          headers: dict[str, str]) -> httpx.Response:
    kw = case.as_transport_kwargs(base_url="http://edge-agent", headers=headers)
    content = kw.get("data")
    if "json" in kw:
        content = json.dumps(kw["json"]).encode()
    return client.request(kw["method"], kw["url"], headers=kw.get("headers"),
                          params=kw.get("params"), content=content)


def _fuzz(op: schemathesis.APIOperation, client: httpx.Client, headers: dict[str, str],
          stats: Stats, examples: int) -> None:
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        _fuzz_mode(op, client, headers, stats, examples, mode)


def _fuzz_mode(op: schemathesis.APIOperation, client: httpx.Client, headers: dict[str, str],
               stats: Stats, examples: int, mode: GenerationMode) -> None:
    positive = mode is GenerationMode.POSITIVE

    @seed(SEED)
    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        _bounded(case, positive)
        try:
            resp = _send(client, case, headers)
        except httpx.TimeoutException:
            stats.cases += 1
            stats.failures.append(f"{op.label} ({mode.value}): no answer within "
                                  f"{TIMEOUT} s: {case.as_curl_command()}")
            return
        except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
            stats.unsendable += 1
            return
        stats.cases += 1
        stats.modes[mode.value] = stats.modes.get(mode.value, 0) + 1
        stats.by_status[resp.status_code] = stats.by_status.get(resp.status_code, 0) + 1
        try:
            case.validate_response(resp, checks=CHECKS)
        except (AssertionError, BaseExceptionGroup) as exc:  # reported at the end
            stats.failures.append(f"{op.label} ({mode.value}): {exc}"[:3000])

    try:
        run()
    except Unsatisfiable:
        if positive:
            raise  # an operation without parameters or body has no invalid form


def _run(fuzzed: Fuzzed, identity: str, headers: dict[str, str]) -> Stats:
    schema = schemathesis.openapi.from_dict(json.loads(DOC.read_text(encoding="utf-8")))
    stats = Stats(identity)
    t0 = time.monotonic()
    with fuzzed.daemon.client(timeout=TIMEOUT) as client:
        ops = [result.ok() for result in schema.get_all_operations()]
        # Load and unload last: the model stays loaded for every other case (a reload of it
        # costs seconds).
        ops.sort(key=lambda op: (op.path.endswith("/unload"), op.path.endswith("/load")))
        v1 = {op.path for op in ops if op.path.startswith("/v1/")}
        for op in ops:
            # The routes without /v1 are the same handlers as their /v1 twins: fewer cases.
            twin = f"/v1{op.path}" in v1
            _fuzz(op, client, headers, stats, max(1, EXAMPLES // 4) if twin else EXAMPLES)
        print(f"{stats.line()} in {time.monotonic() - t0:.1f} s")
        d = fuzzed.daemon
        assert d.proc is not None and d.proc.poll() is None, d.stderr()[-4000:]
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
    return stats


@pytest.mark.slow
@pytest.mark.parametrize("identity", ["admin", "app"])
def test_fuzz_every_operation(fuzzed: Fuzzed, identity: str) -> None:
    headers = {} if identity == "admin" else {"Authorization": f"Bearer {fuzzed.app_token}"}
    stats = _run(fuzzed, identity, headers)
    assert stats.cases >= EXAMPLES  # it did send
    assert not stats.failures, f"{stats.line()}\n\n" + "\n\n".join(stats.failures[:20])
    if identity == "app":  # the token's role, not root's uid, decided
        assert stats.by_status.get(403, 0) > 0
