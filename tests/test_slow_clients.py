"""Clients that never read ([hardening] finding 3), against the real daemon and SmolLM2.

A client sends a streamed chat request on a raw Unix socket and reads nothing. Its events
fill the socket's buffer (on a Unix stream socket the sender's: each event is a kernel
buffer of its own, so with `top_logprobs` 20 making each token's event ~2 KB, about a
hundred tokens fill it), then aiohttp's, and the handler's writes wait. Such a client used
to keep its model's queue slot for as long as its socket stayed open; now the slot is
freed when the generation ends, a write waits at most `server.write_timeout_seconds`, and
one peer may have at most `server.max_requests_per_peer` requests in progress.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from daemon import Daemon, prepare_home, running

SMOL = "smollm2-135m"
ROUTE = "/v1/chat/completions"
CHAT = [{"role": "user", "content": "Count from one to one thousand."}]
PARALLEL = 2  # requests generating at once; with queue_size 0, a third is refused (429)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    return prepare_home(tmp_path_factory.mktemp("home"), {SMOL: smollm2_gguf})


def settings(parallel: int = PARALLEL, queue: int = 0, context: int = 1024,
             **server: str) -> dict[str, str]:
    env = {"EDGE_AGENT_RUNTIME__PARALLEL": str(parallel),
           "EDGE_AGENT_RUNTIME__QUEUE_SIZE": str(queue),
           "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": str(context)}
    return env | {f"EDGE_AGENT_SERVER__{k.upper()}": v for k, v in server.items()}


def stuck_stream(d: Daemon, max_tokens: int, n: int = 1) -> socket.socket:
    """A client that sends a streamed chat request and never reads the answer."""
    body = json.dumps({"model": SMOL, "messages": CHAT, "stream": True, "temperature": 0,
                       "max_tokens": max_tokens, "ignore_eos": True, "logprobs": True,
                       "top_logprobs": 20, "n": n}).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.socket))
    s.sendall(f"POST {ROUTE} HTTP/1.1\r\nHost: edge-agent\r\nContent-Type: application/json"
              f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


@contextmanager
def stuck_streams(d: Daemon, count: int, max_tokens: int,
                  n: int = 1) -> Iterator[list[socket.socket]]:
    with d.client() as c:  # loaded first: until then the model admits one request at a time
        assert c.post(f"/agent/v1/models/{SMOL}/load", json={}).status_code == 200
    with ExitStack() as stack:
        yield [stack.enter_context(stuck_stream(d, max_tokens, n)) for _ in range(count)]


def read_to_end(s: socket.socket, timeout: float) -> bytes:
    """Everything `s` receives until the daemon closes it (or, on a kept-alive connection,
    until the stream's last event)."""
    s.settimeout(timeout)
    data = b""
    while not ended(data):
        part = s.recv(1 << 16)
        if not part:
            break
        data += part
    return data


def ended(data: bytes) -> bool:
    """Whether `data` holds a whole chunked SSE response, [DONE] and the last chunk."""
    return data.endswith(b"\r\n0\r\n\r\n") and b"data: [DONE]" in data[-64:]


class Metrics:
    """The daemon's /metrics, read over one kept-alive connection (a client per reading
    costs ~0.1 s of CPU, taken from the model on a 2-core machine)."""

    def __init__(self, d: Daemon) -> None:
        self._client = d.client()

    def __call__(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self._client.get("/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
                return float(value)
        return 0.0

    def close(self) -> None:
        self._client.close()


@contextmanager
def metrics(d: Daemon) -> Iterator[Metrics]:
    m = Metrics(d)
    try:
        yield m
    finally:
        m.close()


def until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Wait (polling, at most `timeout` s) until `check()`; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)  # the polling interval: each check is a request to the daemon
    return time.monotonic() - t0


def ask(d: Daemon) -> tuple[int, float]:
    """A normal client's short chat request: its status and how long it waited."""
    t0 = time.monotonic()
    with d.client(timeout=60) as c:
        r = c.post(ROUTE, json={"model": SMOL, "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 4})
    return r.status_code, time.monotonic() - t0


def test_streams_nobody_reads_give_their_model_slots_back_when_generation_ends(
    home: Path,
) -> None:
    # As many stuck streams as the model admits: before the fix they held every slot for as
    # long as their sockets stayed open, and everyone else got 429.
    tokens = 140  # ~250 KB of events each: more than the buffers take, so the writes wait
    with running(home, settings(write_timeout_seconds="300")) as d, metrics(d) as metric:
        before = metric("edge_agent_tokens_generated_total", model=SMOL)
        with stuck_streams(d, PARALLEL, tokens) as streams:
            gen = until("the stuck streams' generations end",
                  lambda: metric("edge_agent_tokens_generated_total", model=SMOL)
                  >= before + len(streams) * tokens, timeout=240)
            status, waited = ask(d)
            depth = metric("edge_agent_queue_depth", model=SMOL)
            # The premise: the stuck requests were still in progress, their handlers waiting
            # on writes (a request is counted when its handler returns).
            done = metric("edge_agent_requests_total", route=ROUTE, code="200")
            whole = [read_to_end(s, timeout=60) for s in streams]
        print(f"\n{len(streams)} stuck streams generated in {gen:.1f} s; a normal client then: "
              f"{status} in {waited:.2f} s")
        assert status == 200, f"refused while the stuck streams were held: {status}"
        assert waited < 30, f"the normal client waited {waited:.1f} s"
        assert depth == 0, depth  # the stuck ones no longer count as queued
        assert done == 1, f"{done - 1:.0f} of the stuck requests had finished"
        for w in whole:  # read at last, each stream is whole
            assert ended(w), w[-200:]
            assert w.count(b'"finish_reason": "length"') == 1
        assert metric("edge_agent_write_timeouts_total", route=ROUTE) == 0


def test_a_stream_nobody_reads_is_cut_off_after_the_write_timeout(home: Path) -> None:
    tokens = 400  # far more than the buffers hold: the writes wait, then time out
    # Four choices a stream: four events a decode step, so the buffers fill in ~30 steps.
    with (running(home, settings(parallel=8, context=512, write_timeout_seconds="1")) as d,
          metrics(d) as metric):
        before = metric("edge_agent_tokens_generated_total", model=SMOL)
        with stuck_streams(d, 2, tokens, n=4) as streams:
            took = until("both stuck streams are aborted",
                         lambda: metric("edge_agent_write_timeouts_total", route=ROUTE) == 2,
                         timeout=240)
            cut = [read_to_end(s, timeout=10) for s in streams]  # EOF: the daemon closed them
        for data in cut:
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
            assert b"[DONE]" not in data, "the stream ran to its end"
        # Their generations were stopped and their admission freed...
        until("the queue is empty", lambda: metric("edge_agent_queue_depth", model=SMOL) == 0,
              timeout=10)
        generated = metric("edge_agent_tokens_generated_total", model=SMOL) - before
        # 8 choices of `tokens` each were asked for; they stopped when their clients were cut
        assert generated < 2 * tokens, f"{generated} tokens generated for clients cut off"
        status, waited = ask(d)  # ...and the model serves the next caller
        assert status == 200
        print(f"\nstuck streams aborted {took:.1f} s after they were sent (write timeout 1 s), "
              f"{generated:.0f} of {8 * tokens} tokens generated; next client: {waited:.2f} s")
    assert "did not read its response for 1 s (server.write_timeout_seconds)" in d.stderr()


def test_a_peer_beyond_max_requests_per_peer_gets_429(home: Path) -> None:
    # The model would take more (queue_size 4): what refuses the third request is the cap.
    with running(home, settings(queue=4, max_requests_per_peer="2")) as d:
        with stuck_streams(d, 2, 600) as streams:
            for s in streams:  # both requests are in progress: their answers have begun
                s.settimeout(60)
                assert s.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"
            with d.client(timeout=30) as c:  # (without the cap, r would wait for a slot)
                r = c.post(ROUTE, json={"model": SMOL, "messages": CHAT, "max_tokens": 1})
                models = c.get("/v1/models")  # every route counts...
                health = c.get("/healthz")  # ...but health checks
        for refused in (r, models):
            assert refused.status_code == 429, (refused.status_code, refused.text)
            assert refused.headers["Retry-After"] == "1"
            err = refused.json()["error"]
            assert err["code"] == "too_many_requests_per_peer", err
            assert "server.max_requests_per_peer" in err["message"], err["message"]
            assert err["message"].startswith(f"uid:{os.getuid()} has 2 requests"), err
        assert health.status_code == 200
        # The stuck clients closed: their slots are free again.
        until("a request is served once the stuck clients left", lambda: ask(d)[0] == 200,
              timeout=30)
        assert d.metric("edge_agent_peer_limited_total") >= 1
