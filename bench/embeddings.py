"""Embeddings over the socket vs. in-process: the cost of the daemon's path.

    python bench/embeddings.py [--rounds N]   -> bench/results/embeddings.json

The same 32 texts go (a) through the real daemon (`python -m agent serve` on a Unix socket,
`POST /v1/embeddings` with the `openai` client: JSON, auth, audit, the scheduler's queue
and the model's own thread) and (b) straight into onnxruntime in this process, with the
same model file (all-MiniLM-L6-v2 int8), the same tokenizer, padding, pooling and threads.
The figure is embeddings/s (a) ÷ (b) at batch 32; the goal is >= 0.9. Batch 1 is shown too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon import running  # noqa: E402

from agent.runtime.onnx import OnnxEmbedder  # noqa: E402
from agent.runtime.types import ResolvedModel  # noqa: E402
from agent.settings import RuntimeSettings  # noqa: E402
from registry.service import open_registry  # noqa: E402

ALIAS = "minilm-l6-v2"
TEXTS = [f"Sentence {i} about the weather, the markets and a cat on a mat, "
         + "with a few more words " * (i % 4) for i in range(32)]


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-emb-"))
    reg = open_registry(home)
    reg.pull(ALIAS)
    path = reg.materialize(ALIAS, "onnx-int8-cpu")
    reg.close()
    settings = RuntimeSettings(threads=2)
    resolved = ResolvedModel(alias=ALIAS, variant="onnx-int8-cpu", format="onnx",
                             quantization="int8", target="cpu", sha256="0" * 64,
                             path=str(path), task="embedding", context_length=512,
                             estimated_memory=1)
    out: dict[str, object] = {"model": f"{ALIAS} (onnx int8)", "threads": 2,
                              "rounds": args.rounds, "texts": len(TEXTS)}
    with running(home, {"EDGE_AGENT_RUNTIME__THREADS": "2"}) as d:
        client = d.openai()
        direct = OnnxEmbedder.load(resolved, settings)
        for b in (32, 1):
            def inproc(b: int = b) -> None:
                for i in range(0, 32, b):
                    direct.embed(TEXTS[i:i + b])

            def over_socket(b: int = b) -> None:
                for i in range(0, 32, b):
                    client.embeddings.create(model=ALIAS, input=TEXTS[i:i + b])

            inproc()
            over_socket()  # warm-up: the daemon loads the model on its first request
            # Interleaved, so a busy neighbour on the machine slows both sides alike.
            t_in, t_sock = [], []
            for _ in range(args.rounds):
                t_in.append(seconds(inproc))
                t_sock.append(seconds(over_socket))
            rate_in = 32 / statistics.median(t_in)
            rate_sock = 32 / statistics.median(t_sock)
            out[f"batch{b}"] = {"socket_per_s": round(rate_sock, 1),
                                "inprocess_per_s": round(rate_in, 1),
                                "ratio": round(rate_sock / rate_in, 3)}
        reference = direct.embed(TEXTS).vectors
        direct.close()
        got = np.array([e.embedding for e in client.embeddings.create(
            model=ALIAS, input=TEXTS).data])
    out["max_abs_diff_vs_inprocess"] = float(np.abs(got - reference).max())
    dest = ROOT / "bench" / "results" / "embeddings.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
