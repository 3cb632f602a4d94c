"""Resource exhaustion through the real daemon ([hardening]): many connections at once,
clients that trickle their request a byte at a time, oversized bodies, huge `max_tokens`
and `n`. Each ends in a clean answer or a closed connection, the daemon keeps serving,
and its open file descriptors return to where they were.

Timeouts are short here (`server.header_timeout_seconds` and `body_timeout_seconds` 1 s;
the defaults are 20 and 30 s). Pauses between a trickling client's bytes are that client's
pace, not synchronisation: what the test waits for is the daemon closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, prepare_home, running

pytestmark = pytest.mark.slow

SMOL = "smollm2-135m"
TIMEOUT = 1.0  # header and body timeouts of the daemon under test
MAX_BODY = 65536
PARALLEL = 2
CONNECTIONS = 200


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[Daemon]:
    home = prepare_home(tmp_path_factory.mktemp("home"), {SMOL: smollm2_gguf})
    env = {"EDGE_AGENT_SERVER__HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
           "EDGE_AGENT_SERVER__BODY_TIMEOUT_SECONDS": str(TIMEOUT),
           "EDGE_AGENT_SERVER__MAX_BODY_BYTES": str(MAX_BODY),
           "EDGE_AGENT_RUNTIME__PARALLEL": str(PARALLEL),
           "EDGE_AGENT_RUNTIME__QUEUE_SIZE": "2",
           "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": "512"}
    with running(home, env) as d:
        with d.client() as c:  # the model loaded, so its files count in the baseline
            assert c.post(f"/agent/v1/models/{SMOL}/load", json={"keep_alive": -1}
                          ).status_code == 200
        yield d


def fds(d: Daemon) -> int:
    assert d.proc is not None
    return sum(1 for _ in Path(f"/proc/{d.proc.pid}/fd").iterdir())


def settle_fds(d: Daemon, baseline: int, timeout: float = 10) -> int:
    """Wait (at most `timeout` s) until the daemon holds no more fds than `baseline`."""
    deadline = time.monotonic() + timeout
    while (now := fds(d)) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc: there is no event for an fd being closed
    return now


def connections(d: Daemon) -> int:
    """Connections the daemon holds accepted on its socket, as the kernel lists them: its
    fds whose socket is connected and carries the socket's path in /proc/net/unix (an
    accepted socket shows its listener's path; the listener itself is not connected).
    Counted exactly, not as fds above a baseline: a file the daemon had open for a moment
    made that baseline one off in two clean-clone runs."""
    assert d.proc is not None
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[5] == "03" and f[7] == str(d.socket):
            inodes.add(f"socket:[{f[6]}]")
    held = 0
    for fd in Path(f"/proc/{d.proc.pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed between the listing and the read
            held += os.readlink(fd) in inodes
    return held


async def accepted(d: Daemon, count: int, timeout: float = 10) -> int:
    """Wait (at most `timeout` s) until the daemon has accepted `count` connections:
    connect() returns once the kernel has queued a connection, before the daemon accepts
    it."""
    deadline = time.monotonic() + timeout
    while (now := connections(d)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling /proc: no event for an accept
    return now


def baseline_fds(d: Daemon, window: float = 0.5) -> int:
    """The daemon's fds at rest: after a request on a connection that is then closed, the
    fewest it holds over `window` s. Not the last reading: a file the daemon has open for
    a moment (a periodic job's read) once made the baseline one too high, so the 200
    connections "never" all arrived, and the wait outlasted this module's 1 s header
    timeout, which closed the first connections before their requests were written."""
    with d.client() as c:
        assert c.get("/healthz").status_code == 200
    deadline = time.monotonic() + window
    low = fds(d)
    while time.monotonic() < deadline:
        time.sleep(0.02)  # polling /proc: there is no event for an fd being closed
        low = min(low, fds(d))
    return low


def served(d: Daemon) -> None:
    """The daemon answers a chat."""
    with d.client(timeout=60) as c:
        r = c.post("/v1/chat/completions", json={
            "model": SMOL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def test_200_connections_at_once_are_answered_or_refused_and_their_fds_released(
    agent: Daemon,
) -> None:
    before = baseline_fds(agent)
    models = b"GET /v1/models HTTP/1.1\r\nHost: edge-agent\r\nConnection: close\r\n\r\n"
    body = json.dumps({"model": SMOL, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    chat = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge-agent\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> tuple[list[bytes], int]:
        conns = [await asyncio.open_unix_connection(str(agent.socket))
                 for _ in range(CONNECTIONS)]
        # All accepted, open at once; waited for well within the header timeout, after
        # which the daemon closes a connection that has sent nothing (then `held` says so).
        held = await accepted(agent, CONNECTIONS, timeout=TIMEOUT / 2)
        assert held == CONNECTIONS, f"{held} of {CONNECTIONS} connections accepted"
        for i, (_, w) in enumerate(conns):  # every 20th a chat, which mostly meets a 429
            w.write(chat if i % 20 == 0 else models)

        async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bytes:
            try:
                return await asyncio.wait_for(r.read(), 60)  # to EOF: Connection: close
            finally:
                w.close()

        return await asyncio.gather(*(answer(r, w) for r, w in conns)), held

    answers, held = asyncio.run(main())
    statuses = [status_of(a) for a in answers]
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"\n{CONNECTIONS} connections, {held} held at once by the daemon ({before} fds "
          f"before); answers {counts}")
    assert set(statuses) <= {200, 429}, counts
    assert counts.get(200, 0) >= CONNECTIONS // 2, counts
    for a, s in zip(answers, statuses, strict=True):
        if s == 429:  # refused with the OpenAI error shape and a reason
            assert json.loads(a.partition(b"\r\n\r\n")[2])["error"]["code"], a
    served(agent)
    after = settle_fds(agent, before)
    assert after <= before, f"the daemon holds {after} fds, {before} before the connections"


def trickle(d: Daemon, head: bytes, tail: bytes, count: int) -> list[tuple[float, bytes]]:
    """`count` clients that each send `head` at once, then `tail` one byte every 0.2 s;
    for each, how long after its head the daemon closed it and what it answered."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        s.sendall(head)
        socks.append(s)
    t0 = time.monotonic()
    got = {s: b"" for s in socks}
    closed: dict[socket.socket, float] = {}
    sent = 0
    try:
        while len(closed) < count and time.monotonic() - t0 < 10 * TIMEOUT:
            for s in socks:
                if s not in closed and sent < len(tail):
                    try:
                        s.send(tail[sent:sent + 1])
                    except OSError:  # EPIPE / ECONNRESET: closed under us
                        closed[s] = time.monotonic() - t0
            sent += 1
            # the client's pace; it wakes early when the daemon answers or closes
            readable, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.2)
            for s in readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                got[s] += data
                if not data:
                    closed[s] = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    return [(closed.get(s, float("inf")), got[s]) for s in socks]


def test_clients_that_trickle_headers_or_bodies_are_cut_off(agent: Daemon) -> None:
    before = baseline_fds(agent)
    slow_head = trickle(agent, b"GET /v1/models HTTP/1.1\r\nHost: edge-agent\r\n",
                        b"X-Slow: " + b"a" * 200 + b"\r\n\r\n", 20)
    silent = trickle(agent, b"", b"", 5)  # connect and send nothing
    body = json.dumps({"model": SMOL, "messages": [{"role": "user", "content": "x" * 200}]})
    slow_body = trickle(agent, b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge-agent\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body), body.encode(), 20)
    served(agent)  # the daemon kept serving
    for took, data in slow_head + silent:
        assert TIMEOUT * 0.8 <= took < TIMEOUT + 3, took  # cut at the header timeout...
        assert data == b"", data[:200]  # ...without an answer: no request was made
    codes = []
    for took, data in slow_body:
        # 408 when its body was being read; 429 when the per-client cap refused it first
        # (the rest of its body then read and dropped for at most the body timeout)
        assert TIMEOUT * 0.8 <= took < TIMEOUT + 3, took
        assert status_of(data) in (408, 429), data[:300]
        error = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
        codes.append(error["code"])
        if status_of(data) == 408:
            assert error["code"] == "body_timeout", error
            assert "server.body_timeout_seconds" in error["message"], error
    assert "body_timeout" in codes, codes
    print(f"\ncut off after {max(t for t, _ in slow_head):.2f} s (headers), "
          f"{max(t for t, _ in slow_body):.2f} s (bodies)")
    after = settle_fds(agent, before)
    assert after <= before, f"the daemon holds {after} fds, {before} before the slow clients"


def test_oversized_bodies_get_413_naming_the_limit(agent: Daemon) -> None:
    big = json.dumps({"model": SMOL, "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    with agent.client() as c:
        declared = c.post("/v1/chat/completions", content=big.encode(),
                          headers={"Content-Type": "application/json"})
        chunked = c.post("/v1/chat/completions", content=iter([big.encode()[:1000],
                                                               big.encode()[1000:]]))
        still = c.get("/v1/models")
    for r in (declared, chunked):  # refused on its Content-Length, or once past the limit
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "body_too_large"
        assert f"the limit is {MAX_BODY} bytes (server.max_body_bytes)" in error["message"]
    assert f"({len(big)} bytes)" in declared.json()["error"]["message"]
    assert still.status_code == 200


def test_huge_max_tokens_is_clamped_to_the_context_and_huge_n_refused(agent: Daemon) -> None:
    with agent.client(timeout=60) as c:
        loaded = c.get("/agent/v1/loaded").json()["models"]
        n_ctx = next(m for m in loaded if m["alias"] == SMOL)["details"]["n_ctx"]
        room = 12
        prompt = [28] * (n_ctx - room)  # token ids: leave `room` tokens of context
        r = c.post("/v1/completions", json={"model": SMOL, "prompt": prompt,
                                            "max_tokens": 10**30, "ignore_eos": True})
        assert r.status_code == 200, r.text
        out = r.json()  # OpenAI would say 400; llama.cpp's server clamps, so do we
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == room, out["usage"]

        digits = b'{"model": "%s", "prompt": "Hi", "max_tokens": 1%s}' % (
            SMOL.encode(), b"0" * 5000)  # past Python's int-parsing limit of 4300 digits
        r = c.post("/v1/completions", content=digits)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"

        for n, says in ((10**9, "n"), (16, "runtime.parallel")):
            r = c.post("/v1/chat/completions", json={
                "model": SMOL, "n": n, "max_tokens": 1,
                "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 400, (n, r.text)
            assert r.json()["error"]["param"] == "n"
            assert says in r.json()["error"]["message"], r.json()
        assert c.get("/healthz").status_code == 200
