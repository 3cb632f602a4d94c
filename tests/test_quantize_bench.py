"""On-device quantization and benchmarks with real models, through the CLI: new GGUF
variants from llama.cpp's quantizer, ONNX fp32 -> int8, sizes that match the files,
benchmark results stored per hardware and used by selection, and the plot."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.runtime.backend import load_backend
from agent.runtime.resolver import ModelResolver
from agent.runtime.types import GenerationRequest, Sampling
from agent.settings import load_settings
from registry.bench import results
from registry.service import open_registry

pytestmark = pytest.mark.slow

SMOL = "smollm2-135m"
PARA = "paraphrase-minilm-l3-v2"
# Small enough for `make test`: one perplexity window, a short generation.
BENCH_ENV = {"EDGE_AGENT_BENCH__PERPLEXITY_MAX_TOKENS": "256",
             "EDGE_AGENT_BENCH__GENERATION_TOKENS": "16",
             "EDGE_AGENT_BENCH__EMBEDDING_INPUTS": "16",
             "EDGE_AGENT_RUNTIME__THREADS": "2",
             "EDGE_AGENT_RUNTIME__CONTEXT_LENGTH": "512"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"EDGE_AGENT_HOME": str(tmp_path_factory.mktemp("home")), **BENCH_ENV}


def cli(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.stdout


@pytest.fixture(scope="module")
def quantized(env: dict[str, str]) -> Iterator[list[dict[str, object]]]:
    cli(env, "models", "pull", SMOL)
    q8 = json.loads(cli(env, "models", "quantize", SMOL, "--to", "Q8_0", "--json"))
    q4 = json.loads(cli(env, "models", "quantize", SMOL, "--to", "Q4_0", "--json"))
    assert (q8["variant"], q4["variant"]) == ("gguf-q8_0-cpu", "gguf-q4_0-cpu")
    yield q4["sizes"]


def test_quantized_variants_are_registered_with_sizes_that_match_their_files(
    env: dict[str, str], quantized: list[dict[str, object]]
) -> None:
    reg = open_registry(Path(env["EDGE_AGENT_HOME"]))
    try:
        variants = {v.name: v for v in reg.get(SMOL).variants}
        assert set(variants) == {"gguf-q4_1-cpu", "gguf-q8_0-cpu", "gguf-q4_0-cpu"}
        for row in quantized:
            v = variants[str(row["variant"])]
            assert v.sha256 is not None
            assert row["bytes"] == v.file_size == reg.store.path(v.sha256).stat().st_size
        largest = max(int(str(r["bytes"])) for r in quantized)
        for row in quantized:
            expected = round(100 * (1 - int(str(row["bytes"])) / largest), 1)
            assert row["reduction_pct"] == expected
        assert quantized[0]["variant"] == "gguf-q8_0-cpu" and quantized[0]["reduction_pct"] == 0
        assert variants["gguf-q8_0-cpu"].quantization == "Q8_0"
        assert variants["gguf-q4_0-cpu"].quantization == "Q4_0"
        assert [e.kind for e in reg.events(SMOL)].count("quantized") == 2
    finally:
        reg.close()


@pytest.mark.parametrize("variant", ["gguf-q8_0-cpu", "gguf-q4_0-cpu"])
def test_quantized_variants_load_and_generate(
    env: dict[str, str], quantized: object, variant: str
) -> None:
    settings = load_settings(environ=env)
    reg = open_registry(settings.state)
    try:
        resolver = ModelResolver(settings, reg)
        info, specs, templates = reg.installed(SMOL)
        spec = next(s for s in specs if s.name == variant)
        backend = load_backend(resolver.resolved(info, spec, templates[variant], 1),
                               settings.runtime)
        try:
            req = GenerationRequest(model=SMOL, prompt="The capital of France is",
                                    sampling=Sampling(max_tokens=8, temperature=0))
            chunks = list(backend.generate(req, threading.Event()))
        finally:
            backend.close()
    finally:
        reg.close()
    assert "".join(c.text for c in chunks).strip()
    assert chunks[-1].completion_tokens


def test_quantizing_to_an_existing_or_unknown_type_is_refused(
    env: dict[str, str], quantized: object
) -> None:
    again = CliRunner().invoke(main, ["models", "quantize", SMOL, "--to", "Q8_0"], env=env)
    assert again.exit_code == 1 and "already has a gguf Q8_0 variant" in again.stderr
    odd = CliRunner().invoke(main, ["models", "quantize", SMOL, "--to", "Q9_9"], env=env)
    assert odd.exit_code == 1 and "cannot quantize to 'Q9_9'" in odd.stderr


def test_bench_over_three_variants_is_stored_and_decides_selection(
    env: dict[str, str], quantized: object, tmp_path: Path
) -> None:
    plot = tmp_path / "smol.png"
    out = json.loads(cli(env, "bench", SMOL, "--variants", "all", "--json", "--plot", str(plot)))
    rows = {r["variant"]: r for r in out["results"]}
    assert set(rows) == {"gguf-q4_1-cpu", "gguf-q8_0-cpu", "gguf-q4_0-cpu"}
    for r in rows.values():
        m = r["measured"]
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
        assert m["prompt_tps"] > 0 and m["generation_tps"] > 0 and m["load_seconds"] > 0
        assert m["peak_rss"] > 0
        assert r["details"]["perplexity_tokens"] == 255  # one 256-token window
        assert r["fingerprint"] == out["fingerprint"]
    # Q8_0 reproduces its Q4_1 source's weights exactly, so its perplexity is at least as good
    # (within float noise); Q4_0 requantized from it loses some.
    q8, q41, q40 = (rows[n]["measured"]["perplexity"] for n in
                    ("gguf-q8_0-cpu", "gguf-q4_1-cpu", "gguf-q4_0-cpu"))
    assert q8 <= q41 * 1.01 and q40 > q8
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(plot).shape[:2] == (450, 700)

    settings = load_settings(environ=env)
    reg = open_registry(settings.state)
    try:
        resolver = ModelResolver(settings, reg)
        stored = results(reg, SMOL, resolver.fingerprint())
        assert {r.variant for r in stored} == set(rows)
        # a policy that wants speed within 5 % of the best perplexity
        chosen = resolver.resolve(SMOL).variant
    finally:
        reg.close()
    explain = cli(env, "models", "select", SMOL, "--explain")
    assert f"{SMOL}: {chosen}" in explain
    assert "measured on this device" in explain
    assert "lowest perplexity measured among variants with >= 10 tok/s" in explain
    best = min(rows, key=lambda n: rows[n]["measured"]["perplexity"])
    fast_enough = [n for n in rows if rows[n]["measured"]["generation_tps"] >= 10]
    if best in fast_enough:  # on a loaded machine a variant may miss the 10 tok/s floor
        assert chosen == best


def test_onnx_fp32_quantizes_to_int8_and_benches_against_the_fp32_reference(
    env: dict[str, str], tmp_path: Path
) -> None:
    cli(env, "models", "pull", PARA)
    q = json.loads(cli(env, "models", "quantize", PARA, "--to", "int8", "--json"))
    assert q["variant"] == "onnx-int8-cpu" and q["source"] == "onnx-fp32-cpu"
    sizes = {r["variant"]: r for r in q["sizes"]}
    assert sizes["onnx-int8-cpu"]["reduction_pct"] > 50  # 4-byte weights -> 1 byte (+ scales)
    out = json.loads(cli(env, "bench", PARA, "--variants", "all", "--json"))
    rows = {r["variant"]: r["measured"] for r in out["results"]}
    assert rows["onnx-fp32-cpu"]["agreement"] == pytest.approx(1.0)
    assert 0.9 < rows["onnx-int8-cpu"]["agreement"] < 1.0
    for m in rows.values():
        assert m["embeddings_per_second"] > 0 and m["perplexity"] is None
    table = cli(env, "bench", PARA, "--variants", "onnx-int8-cpu")
    assert "onnx-int8-cpu" in table and "AGREE" in table
