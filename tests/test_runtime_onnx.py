"""The ONNX backend with real onnxruntime and real models: execution-provider fallback,
session options from settings, batching, the scheduler's `run`, and onnxruntime-genai
generation of SmolLM2 built from its GGUF (bench/build_onnx_smollm2.py)."""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.metrics import Metrics
from agent.runtime.onnx import CPU, OnnxEmbedder, choose_provider, open_session, provider_plan
from agent.runtime.scheduler import Scheduler
from agent.runtime.types import ChatMessage, GenerationRequest, ResolvedModel, Sampling
from agent.settings import OnnxSettings, RuntimeSettings
from registry.service import Registry, open_registry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Built by `make onnx-smollm2` (torch + transformers in a throwaway venv: too heavy for
# `make test`); the generation tests run when it is there.
ONNX_SMOLLM2 = Path(os.environ.get("EDGE_AGENT_TEST_ONNX_SMOLLM2",
                                   ROOT / "var" / "models" / "smollm2-135m-onnx-int4"))
needs_genai_build = pytest.mark.skipif(
    not (ONNX_SMOLLM2 / "genai_config.json").is_file(),
    reason=f"no onnxruntime-genai build of SmolLM2 at {ONNX_SMOLLM2}: run `make onnx-smollm2`",
)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = open_registry(tmp_path_factory.mktemp("home"))
    reg.pull("minilm-l6-v2")
    yield reg
    reg.close()


def minilm(reg: Registry, **kw: object) -> ResolvedModel:
    fields: dict[str, object] = {
        "alias": "minilm-l6-v2", "variant": "onnx-int8-cpu", "format": "onnx",
        "quantization": "int8", "target": "cpu", "sha256": "0" * 64,
        "path": str(reg.materialize("minilm-l6-v2", "onnx-int8-cpu")), "task": "embedding",
        "context_length": 512, "estimated_memory": 300_000_000,
    }
    fields.update(kw)
    return ResolvedModel.model_validate(fields)


def test_provider_plan_follows_the_variant_then_the_priority_then_the_cpu() -> None:
    r = ResolvedModel(alias="m", variant="v", format="onnx", quantization="int4",
                      target="cuda", sha256="0" * 64, path="/x", task="chat",
                      estimated_memory=1)
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert provider_plan(r, OnnxSettings(), available) == (available, [])
    cuda_first = OnnxSettings(providers=("CUDAExecutionProvider", "TensorrtExecutionProvider",
                                         CPU))
    assert provider_plan(r, cuda_first, available)[0][0] == "CUDAExecutionProvider"
    pinned = r.model_copy(update={"runtime_requirement": "onnxruntime:TensorrtExecutionProvider"})
    assert provider_plan(pinned, cuda_first, available)[0][0] == "TensorrtExecutionProvider"
    tries, skipped = provider_plan(r, OnnxSettings(), [CPU])
    assert tries == [CPU] and len(skipped) == 2 and "not available" in skipped[0]


def test_an_unavailable_provider_falls_back_to_cpu_with_the_reason(reg: Registry) -> None:
    wanted = minilm(reg, target="cuda", runtime_requirement="onnxruntime:CUDAExecutionProvider")
    backend = OnnxEmbedder.load(wanted, RuntimeSettings(threads=2))
    details = backend.details()
    assert details["provider"] == CPU
    assert any(r.startswith("CUDAExecutionProvider: not available") for r in
               details["provider_fallback"])
    assert backend.embed(["still works"]).vectors.shape == (1, 384)


def test_a_listed_provider_that_fails_to_initialise_falls_back_to_cpu(reg: Registry) -> None:
    # onnxruntime lists only the CPU here; pretend it also listed CUDA: opening with it
    # then fails for real (onnxruntime would quietly run on the CPU; we refuse that).
    wanted = minilm(reg, target="cuda")
    settings = RuntimeSettings(threads=2)
    session, choice = choose_provider(
        wanted, settings.onnx, lambda p: open_session(wanted.path, settings, p),
        available=[*ort.get_available_providers(), "CUDAExecutionProvider"],
    )
    assert choice.provider == CPU and session.get_providers()[0] == CPU
    assert "CUDAExecutionProvider: failed to initialise" in " ".join(choice.fallback)


def test_session_options_come_from_the_settings(reg: Registry) -> None:
    settings = RuntimeSettings(threads=2, onnx=OnnxSettings(
        intra_op_threads=1, graph_optimization="basic", memory_arena=False,
        embedding_batch_size=4))
    backend = OnnxEmbedder.load(minilm(reg), settings)
    opts = backend._session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.enable_cpu_mem_arena is False
    assert backend.details()["batch_size"] == 4


def test_batches_are_padded_to_their_longest_text_and_agree_with_singles(reg: Registry) -> None:
    texts = [("word " * n).strip() for n in (1, 30, 2, 60, 5, 3, 90)]
    backend = OnnxEmbedder.load(minilm(reg), RuntimeSettings(
        threads=2, onnx=OnnxSettings(embedding_batch_size=3)))
    batched = backend.embed(texts)
    singles = np.vstack([backend.embed([t]).vectors for t in texts])
    assert np.abs(batched.vectors - singles).max() <= 1e-5
    assert batched.prompt_tokens == sum(len(backend.tokenize(t)) for t in texts)


def test_scheduler_run_serves_embeddings_through_the_models_queue(reg: Registry) -> None:
    wanted = minilm(reg, target="cuda", runtime_requirement="onnxruntime:CUDAExecutionProvider")

    async def main() -> tuple[list[int], list[dict[str, object]]]:
        sched = Scheduler(RuntimeSettings(threads=2), lambda alias: wanted, Metrics(),
                          budget=10**10)
        await sched.start()
        try:
            outs = await asyncio.gather(*(sched.run("minilm-l6-v2", lambda b, t=t:
                                                    b.embed([t]).vectors.shape[1])
                                          for t in ("a", "b", "c")))
            return list(outs), [m.details for m in sched.loaded()]
        finally:
            await sched.close()

    dims, loaded = asyncio.run(main())
    assert dims == [384, 384, 384]
    # the fallback is reported where `edge-agent ps` and /agent/v1/loaded read it
    assert loaded[0]["provider"] == CPU
    assert "CUDAExecutionProvider: not available" in " ".join(loaded[0]["provider_fallback"])


# -- onnxruntime-genai ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def genai(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not (ONNX_SMOLLM2 / "genai_config.json").is_file():
        pytest.skip(f"no onnxruntime-genai build of SmolLM2 at {ONNX_SMOLLM2}: "
                    "run `make onnx-smollm2`")
    from agent.runtime.backend import load_backend

    reg = open_registry(tmp_path_factory.mktemp("genai"))
    result = reg.import_file(ONNX_SMOLLM2, alias="smollm2-135m")
    v = result.model.variants[0]
    resolved = ResolvedModel(
        alias="smollm2-135m", variant=v.name, format="onnx", quantization=v.quantization,
        target="cpu", sha256=v.sha256 or "", path=str(reg.materialize("smollm2-135m", v.name)),
        task="chat", architecture="llama", context_length=8192, estimated_memory=1,
        chat_template=reg.installed("smollm2-135m")[2][v.name],
    )
    backend = load_backend(resolved, RuntimeSettings(threads=2, context_length=1024))
    yield backend
    backend.close()
    reg.close()


@needs_genai_build
def test_genai_variant_chats_with_the_models_own_template(genai: object) -> None:
    req = GenerationRequest(model="m", messages=[ChatMessage(role="user", content=
                            "Name three colours.")],
                            sampling=Sampling(max_tokens=40, temperature=0))
    chunks = list(genai.generate(req, threading.Event()))  # type: ignore[attr-defined]
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].completion_tokens
    assert any(c in text.lower() for c in ("red", "blue", "green", "yellow")), text
    assert "<|im_end|>" not in text
    assert genai.details()["backend"] == "onnxruntime-genai"  # type: ignore[attr-defined]


@needs_genai_build
def test_genai_stop_sequences_limits_and_cancel(genai: object) -> None:
    req = GenerationRequest(model="m", prompt="1, 2, 3, 4, 5,",
                            sampling=Sampling(max_tokens=30, temperature=0, stop=[" 9"]))
    chunks = list(genai.generate(req, threading.Event()))  # type: ignore[attr-defined]
    text = "".join(c.text for c in chunks)
    assert " 9" not in text and chunks[-1].finish_reason == "stop"
    short = GenerationRequest(model="m", prompt="Once upon a time",
                              sampling=Sampling(max_tokens=3, temperature=0))
    last = list(genai.generate(short, threading.Event()))[-1]  # type: ignore[attr-defined]
    assert last.finish_reason == "length" and last.completion_tokens == 3
    cancel = threading.Event()
    cancel.set()
    assert list(genai.generate(short, cancel)) == []  # type: ignore[attr-defined]


@needs_genai_build
def test_genai_scores_tokens_for_perplexity(genai: object) -> None:
    tokens = genai.tokenize("We hold these truths to be self-evident, that all men are "  # type: ignore[attr-defined]
                            "created equal")
    logps = genai.score(tokens)  # type: ignore[attr-defined]
    assert len(logps) == len(tokens) - 1 and all(lp <= 0 for lp in logps)
    assert 1 < math.exp(-sum(logps) / len(logps)) < 100
