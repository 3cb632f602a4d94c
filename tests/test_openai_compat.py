"""OpenAI compatibility details an app notices, against the real daemon and SmolLM2: the
streaming shape, greedy determinism, typed content, JSON Schema output, logit_bias,
`models.retrieve`, the routes without /v1, and parameters that are refused with a 400
naming them instead of being silently ignored."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from daemon import Daemon, prepare_home, running, sse_events

SMOL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[Daemon]:
    home = prepare_home(tmp_path_factory.mktemp("home"), {SMOL: smollm2_gguf})
    with running(home) as d:
        yield d


def _post(agent: Daemon, path: str, body: dict[str, Any]) -> Any:
    with agent.client() as c:
        return c.post(path, json=body)


def _stream(agent: Daemon, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with agent.client() as c, c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return [e for e in events[:-1] if isinstance(e, dict)]


def test_chat_stream_starts_with_role_and_empty_content_and_ends_with_its_own_finish(
    agent: Daemon
) -> None:
    chunks = _stream(agent, "/v1/chat/completions",
                     {"model": SMOL, "messages": CHAT, "max_tokens": 12, "temperature": 0})
    deltas = [c["choices"][0] for c in chunks]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas[-1]["delta"] == {} and deltas[-1]["finish_reason"] == "length"
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    assert "".join(d["delta"].get("content", "") for d in deltas).strip()


def test_completion_stream_ends_with_an_empty_finish_chunk(agent: Daemon) -> None:
    chunks = _stream(agent, "/v1/completions",
                     {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 8,
                      "temperature": 0})
    last = chunks[-1]["choices"][0]
    assert last["text"] == "" and last["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_temperature_zero_gives_the_same_text_every_time(agent: Daemon) -> None:
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 32, "temperature": 0}
    first = _post(agent, "/v1/chat/completions", body).json()["choices"][0]["message"]
    # Another request in between leaves a different prompt prefix in the model's cache.
    _post(agent, "/v1/chat/completions", {**body, "messages": CHAT})
    again = _post(agent, "/v1/chat/completions", body).json()["choices"][0]["message"]
    third = _post(agent, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert first["content"] == again["content"] == third["content"]


def test_typed_text_parts_are_joined_as_llama_cpp_joins_them(agent: Daemon) -> None:
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book?"}]
    body = {"model": SMOL, "max_tokens": 16, "temperature": 0}
    typed = _post(agent, "/v1/chat/completions",
                  {**body, "messages": [{"role": "user", "content": parts}]}).json()
    plain = _post(agent, "/v1/chat/completions",
                  {**body, "messages": [{"role": "user",
                                         "content": "What is\nthe best book?"}]}).json()
    assert typed["choices"][0]["message"] == plain["choices"][0]["message"]
    assert typed["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_an_image_part_is_refused_with_the_part_named(agent: Daemon) -> None:
    content = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    r = _post(agent, "/v1/chat/completions",
              {"model": SMOL, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages.0.content.1.type" and "images" in err["message"]


def test_models_retrieve_and_the_routes_without_v1(agent: Daemon) -> None:
    client = agent.openai()
    model = client.models.retrieve(SMOL)
    assert model.id == SMOL and model.object == "model"
    r = _post(agent, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "max_tokens": 6,
                                              "temperature": 0})
    bare = _post(agent, "/chat/completions", {"model": SMOL, "messages": CHAT,
                                              "max_tokens": 6, "temperature": 0})
    assert bare.status_code == 200
    assert bare.json()["choices"][0]["message"] == r.json()["choices"][0]["message"]
    with agent.client() as c:
        assert c.get("/models").json()["data"] == c.get("/v1/models").json()["data"]
        missing = c.get("/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


REFUSED = [
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 3),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/completions", "logprobs", 2),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "suffix", "!"),
    ("/v1/completions", "best_of", 2),
]


@pytest.mark.parametrize(("path", "name", "value"), REFUSED,
                         ids=[f"{p.rsplit('/', 1)[1]}-{n}" for p, n, _ in REFUSED])
def test_an_unimplemented_parameter_is_refused_with_its_name(
    agent: Daemon, path: str, name: str, value: object
) -> None:
    base: dict[str, Any] = {"model": SMOL, "max_tokens": 4}
    base.update({"messages": CHAT} if "chat" in path else {"prompt": "Hi"})
    r = _post(agent, path, {**base, name: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and err["code"] == "unsupported_parameter", err


def test_the_off_values_of_those_parameters_are_accepted(agent: Daemon) -> None:
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": CHAT, "max_tokens": 4, "logprobs": False, "tools": [],
        "tool_choice": "none", "modalities": ["text"], "n": 1})
    assert r.status_code == 200, r.text
    r = _post(agent, "/v1/completions", {"model": SMOL, "prompt": "Hi", "max_tokens": 4,
                                         "echo": False, "best_of": 1, "suffix": None})
    assert r.status_code == 200, r.text


def test_logit_bias_bans_a_token(agent: Daemon, smollm2_gguf: Path) -> None:
    from llama_cpp import Llama

    vocab = Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    body = {"model": SMOL, "prompt": "The capital of France is", "max_tokens": 1,
            "temperature": 0}
    first = _post(agent, "/v1/completions", body).json()["choices"][0]["text"]
    token = vocab.tokenize(first.encode(), add_bos=False, special=False)[0]
    banned = _post(agent, "/v1/completions", {**body, "logit_bias": {str(token): -100}})
    assert banned.status_code == 200, banned.text
    text = banned.json()["choices"][0]["text"]
    assert text and text != first
    r = _post(agent, "/v1/completions", {**body, "logit_bias": {"100000000": 5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = _post(agent, "/v1/completions", {**body, "logit_bias": {"12": 500}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias")


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


def test_json_schema_output_validates_for_twenty_requests(agent: Daemon) -> None:
    client = agent.openai()
    rng = random.Random(7)
    people = ["a sailor", "a baker", "a child", "a painter", "an astronaut"]
    for i in range(20):
        resp = client.chat.completions.create(
            model=SMOL, max_tokens=160, temperature=0.8, seed=rng.randrange(1 << 30),
            messages=[{"role": "user", "content": f"Describe {people[i % 5]} as JSON."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": SCHEMA,
                                             "strict": True}},
        )
        assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)


def test_a_schema_without_a_grammar_is_refused(agent: Daemon) -> None:
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": CHAT, "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"$ref": "https://example.com/elsewhere.json"}}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format")
