"""The real daemon on a Unix socket with real models: OpenAI API, errors, lifecycle, stop."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, prepare_home, running, sse_events

SMOL = "smollm2-135m"
GEMMA = "gemma3-270m"
CHAT = [{"role": "user", "content": "Name three colours."}]
# A prompt both models continue for hundreds of tokens: keeps a model busy on demand.
COUNT = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "temperature": 0, "stream": True, "max_tokens": 400}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, gemma3_gguf: Path) -> Path:
    return prepare_home(tmp_path_factory.mktemp("home"), {SMOL: smollm2_gguf, GEMMA: gemma3_gguf})


@pytest.fixture(scope="module")
def agent(home: Path) -> Iterator[Daemon]:
    # context 512: an over-long prompt is cheap to build.
    env = {"EDGE_AGENT_RUNTIME__QUEUE_SIZE": "1", "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": "512"}
    with running(home, env) as d:
        yield d


def test_openai_client_chat_non_streaming(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=24, seed=1)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.strip()
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 24
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_openai_client_chat_streaming(agent: Daemon) -> None:
    client = agent.openai()
    stream = client.chat.completions.create(
        model=SMOL,
        messages=CHAT,
        max_tokens=16,
        stream=True,
        seed=1,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(texts).strip()
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 16


def test_raw_stream_ends_with_done(agent: Daemon) -> None:
    body = {"model": SMOL, "messages": CHAT, "max_tokens": 4, "stream": True}
    with agent.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completions(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.completions.create(
        model=GEMMA, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert resp.choices[0].text.strip()
    assert resp.object == "text_completion"


def test_max_tokens_gives_finish_reason_length(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.completions.create(model=SMOL, prompt="Once upon a time", max_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


def test_stop_sequence_ends_generation_and_is_not_returned(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.completions.create(
        model=GEMMA,
        prompt="1, 2, 3, 4, 5,",
        max_tokens=40,
        temperature=0,
        stop=[" 8"],
    )
    text = resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    assert " 8" not in text and "7" in text


def test_same_seed_gives_same_text(agent: Daemon) -> None:
    client = agent.openai()

    def once() -> str:
        r = client.chat.completions.create(
            model=SMOL, messages=CHAT, max_tokens=24, temperature=0.9, seed=1234
        )
        return r.choices[0].message.content

    assert once() == once()


def test_json_object_output_parses(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.chat.completions.create(
        model=SMOL,
        max_tokens=300,
        seed=3,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}],
    )
    # The grammar allows only JSON; an object the model closed itself (not cut by
    # max_tokens) must parse.
    assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_two_concurrent_clients_on_one_model_are_both_served(agent: Daemon) -> None:
    results: list[str] = []
    barrier = threading.Barrier(2)

    def ask() -> None:
        client = agent.openai()
        barrier.wait()
        r = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=12)
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(results)


def test_queue_overflow_gives_429_with_retry_after(home: Path) -> None:
    # parallel 1, queue_size 0: while the model generates for one client, the next is
    # refused at once. (Waiting in a non-empty queue is covered by test_lifecycle; several
    # generating at once by test_batching.)
    with (
        running(home, {"EDGE_AGENT_RUNTIME__QUEUE_SIZE": "0",
                       "EDGE_AGENT_RUNTIME__PARALLEL": "1"}) as d,
        d.client() as c1,
        d.client() as c2,
        c1.stream("POST", "/v1/completions", json={"model": SMOL, **COUNT}) as r1,
    ):
        lines = r1.iter_lines()
        first = next(lines)  # the model is now busy generating for c1
        assert first.startswith("data: ")
        # The premise, checked rather than assumed: c1's generation is still in progress.
        depth = d.metric("edge_agent_queue_depth", model=SMOL)
        r2 = c2.post("/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 1})
        rest = "".join(lines)
        assert depth == 1, f"c1's generation was not running when c2 asked (depth {depth})"
        assert '"finish_reason": "length"' in rest, rest[-300:]  # c1 ran to the end, unharmed
        assert r2.status_code == 429, (r2.status_code, r2.text)
        assert int(r2.headers["Retry-After"]) >= 1
        assert r2.json()["error"]["code"] == "queue_full"


def test_client_disconnect_stops_generation(agent: Daemon) -> None:
    before = agent.metric("edge_agent_tokens_generated_total", model=SMOL)
    body = {"model": SMOL, **COUNT}
    received = 0
    with agent.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        for event in sse_events(r.iter_lines()):
            if isinstance(event, dict) and event["choices"][0]["text"]:
                received += 1
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    # The abandoned sequence leaves the batch at the next decode step, so by the time this
    # request has finished, the counter below is final for it.
    with agent.client() as c:
        after_req = c.post("/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 1})
    assert after_req.status_code == 200
    generated = agent.metric("edge_agent_tokens_generated_total", model=SMOL) - before
    extra = generated - received - after_req.json()["usage"]["completion_tokens"]
    assert 0 <= extra <= 2, f"{extra} tokens generated after the client left"


def test_unknown_model_is_404_listing_installed(agent: Daemon) -> None:
    with agent.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and SMOL in err["message"] and GEMMA in err["message"]


def test_malformed_json_is_400(agent: Daemon) -> None:
    with agent.client() as c:
        r = c.post("/v1/chat/completions", content=b'{"model": ')
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_field_is_400_naming_it(agent: Daemon) -> None:
    with agent.client() as c:
        r = c.post("/v1/chat/completions", json={"model": SMOL, "messages": CHAT, "temperature": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_over_long_prompt_is_400(agent: Daemon) -> None:
    long = "word " * 2000  # far beyond the 512-token context the daemon loads with
    with agent.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": SMOL, "messages": [{"role": "user", "content": long}]},
        )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_oversized_body_is_413(agent: Daemon) -> None:
    with agent.client() as c:
        r = c.post("/v1/completions", json={"model": SMOL, "prompt": "x" * 2_000_000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                   "/v1/responses", f"/agent/v1/models/{SMOL}/load"])
def test_deeply_nested_json_is_a_400_naming_the_limit(agent: Daemon, route: str) -> None:
    # [hardening] finding 9: 100,000 nested arrays (200 KB) made json.loads raise
    # RecursionError, a 500 with a traceback.
    with agent.client() as c:
        r = c.post(route, content=b"[" * 100_000 + b"]" * 100_000,
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"
        assert "nested deeper than 64" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200


def test_nesting_inside_a_valid_request_is_bounded_too(agent: Daemon) -> None:
    deep: object = "x"
    for _ in range(70):
        deep = {"a": deep}
    chat = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    nested_args = "[" * 50_000 + "]" * 50_000  # a string field holding deep JSON
    with agent.client() as c:
        r = c.post("/v1/chat/completions", json={**chat, "metadata": {"k": deep}})
        assert r.status_code == 400 and "nested deeper than 64" in r.text
        r = c.post("/v1/chat/completions", json={**chat, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": nested_args}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"
        assert c.post("/v1/chat/completions", json=chat).status_code == 200


def test_models_list_and_agent_api(agent: Daemon) -> None:
    with agent.client() as c:
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert ids == {SMOL, GEMMA}
        detail = c.get(f"/agent/v1/models/{SMOL}").json()
        assert detail["selection"]["chosen"]["name"] == "gguf-q4_1-cpu"
        assert c.get("/agent/v1/device").json()["cpu"]["cores_logical"] >= 1
        loaded = c.post(f"/agent/v1/models/{GEMMA}/load", json={"keep_alive": "10m"}).json()
        assert loaded["alias"] == GEMMA and loaded["memory_bytes"] > 0
        ps = {m["alias"]: m for m in c.get("/agent/v1/loaded").json()["models"]}
        assert GEMMA in ps and ps[GEMMA]["queue_depth"] == 0
        assert c.post(f"/agent/v1/models/{GEMMA}/unload").json()["unloaded"] is True
        assert GEMMA not in {m["alias"] for m in c.get("/agent/v1/loaded").json()["models"]}
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200


def test_metrics_are_prometheus_text(agent: Daemon) -> None:
    with agent.client() as c:
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in (
        "edge_agent_requests_total",
        "edge_agent_time_to_first_token_seconds_bucket",
        "edge_agent_inter_token_latency_seconds_bucket",
        "edge_agent_loaded_models",
        "edge_agent_model_load_seconds_bucket",
        "edge_agent_queue_depth",
    ):
        assert name in r.text


def test_handler_sees_peer_credentials_of_the_connecting_process(agent: Daemon) -> None:
    # A child that drops to uid/gid 65534 connects; the agent must report that uid and pid.
    os.chmod(agent.sockdir, 0o755)
    os.chmod(agent.socket, 0o666)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with agent.client() as c:
                body = c.get("/agent/v1/whoami").content
            os.write(write_fd, body)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        seen = json.loads(f.read())
    os.waitpid(pid, 0)
    assert (seen["transport"], seen["pid"], seen["uid"], seen["gid"]) == ("unix", pid, 65534, 65534)
    assert seen["subject"].startswith("uid:65534")


def test_second_agent_on_the_same_socket_is_refused(agent: Daemon, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**agent.env, "EDGE_AGENT_HOME": str(tmp_path)}
    env.pop("NOTIFY_SOCKET")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "already serving" in proc.stderr


def test_stale_socket_file_is_replaced(tmp_path: Path, smollm2_gguf: Path) -> None:
    import socket as so

    d = Daemon(tmp_path)
    stale = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    stale.bind(str(d.socket))
    stale.close()  # the file stays, nobody listens: what a crash leaves
    d.start()
    try:
        with d.client() as c:
            assert c.get("/healthz").status_code == 200
        assert (d.socket.stat().st_mode & 0o777) == 0o660
    finally:
        assert d.stop() == 0


def test_sigterm_mid_stream_exits_cleanly_and_keeps_registry(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf})
    d = Daemon(home, {"EDGE_AGENT_SERVER__SHUTDOWN_GRACE_SECONDS": "1"}).start()
    body = {
        "model": SMOL,
        "messages": CHAT,
        "max_tokens": 2000,
        "stream": True,
        "temperature": 1.0,
        "seed": 9,
    }
    with d.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        d.wait_for("STOPPING=1")
        events = list(sse_events(lines))  # ends: finished, or stopped at the grace period
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert isinstance(last, dict)
    assert last.get("error", {}).get("code") == "stopping" or last["choices"][0][
        "finish_reason"
    ] in ("stop", "length")
    assert d.proc.wait(60) == 0, d.stderr()  # type: ignore[union-attr]
    assert not d.socket.exists()
    with sqlite3.connect(home / "registry.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT alias FROM models").fetchall() == [(SMOL,)]
    d.stop()


def test_corrupt_model_file_gives_503_while_others_serve(
    tmp_path: Path, smollm2_gguf: Path, gemma3_gguf: Path
) -> None:
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf, GEMMA: gemma3_gguf})
    # Damage the stored blob after import, as a failing disk would.
    blob = next(
        p
        for p in (home / "store").rglob("*")
        if p.is_file() and p.stat().st_size == gemma3_gguf.stat().st_size
    )
    blob.chmod(0o640)
    with blob.open("r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 4096)
    with running(home) as d, d.client() as c:
        bad = c.post("/v1/completions", json={"model": GEMMA, "prompt": "Hi", "max_tokens": 2})
        assert bad.status_code == 503
        assert bad.json()["error"]["code"] == "model_load_failed"
        assert GEMMA in bad.json()["error"]["message"]
        good = c.post("/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 2})
        assert good.status_code == 200
        assert c.get("/healthz").status_code == 200


def test_memory_budget_for_one_model_evicts_the_idle_one(
    tmp_path: Path, smollm2_gguf: Path, gemma3_gguf: Path
) -> None:
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf, GEMMA: gemma3_gguf})
    with (
        running(home, {"EDGE_AGENT_RUNTIME__MEMORY_BUDGET_BYTES": "900000000"}) as d,
        d.client() as c,
    ):
        assert (
            c.post(
                "/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 1}
            ).status_code
            == 200
        )
        assert (
            c.post(
                "/v1/completions", json={"model": GEMMA, "prompt": "Hi", "max_tokens": 1}
            ).status_code
            == 200
        )
        loaded = [m["alias"] for m in c.get("/agent/v1/loaded").json()["models"]]
        assert loaded == [GEMMA]


def test_a_model_larger_than_the_memory_budget_is_refused_before_loading(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    """Refused from its estimate, before llama.cpp maps a byte: no load, no OOM kill."""
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf})
    with (
        running(home, {"EDGE_AGENT_RUNTIME__MEMORY_BUDGET_BYTES": "50000000"}) as d,
        d.client() as c,
    ):
        assert d.proc is not None
        r = c.post("/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 1})
        # Selection refuses it from the estimate (the residency's own check, the same
        # budget, would refuse it next): the request is wrong for this device, not an outage.
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith(
            f"no variant of {SMOL} fits: smallest needs ")
        assert r.json()["error"]["message"].endswith("budget is 50 MB")
        assert c.get("/agent/v1/loaded").json()["models"] == []
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert "/store/" not in maps and "/views/" not in maps  # the file was never mapped
        assert c.get("/healthz").status_code == 200


def test_keep_alive_zero_unloads_after_the_request(tmp_path: Path, smollm2_gguf: Path) -> None:
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf})
    with running(home) as d, d.client() as c:
        r = c.post(
            "/v1/completions",
            json={"model": SMOL, "prompt": "Hi", "max_tokens": 1, "keep_alive": 0},
        )
        assert r.status_code == 200
        # The unload happens when the request's slot is released, before the next request
        # to the same lifecycle is handled: a load/unload round trip orders them.
        assert c.post(f"/agent/v1/models/{SMOL}/unload").json()["unloaded"] is False
