"""OpenAI compatibility details an app notices, against the real daemon and SmolLM2: the
streaming shape, greedy determinism, typed content, JSON Schema output, logit_bias,
`models.retrieve`, the routes without /v1, and parameters that are refused with a 400
naming them instead of being silently ignored."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "reasoning_effort", "high"),
    ("/v1/chat/completions", "verbosity", "low"),
    ("/v1/chat/completions", "store", True),
    ("/v1/chat/completions", "metadata", {"k": "v"}),
    ("/v1/chat/completions", "moderation", {"type": "auto"}),
    ("/v1/chat/completions", "prompt_cache_key", "k"),
    ("/v1/chat/completions", "prompt_cache_options", {"mode": "x"}),
    ("/v1/chat/completions", "prompt_cache_retention", "24h"),
    ("/v1/chat/completions", "service_tier", "flex"),
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
        "model": SMOL, "messages": CHAT, "max_tokens": 4, "logprobs": False,
        "modalities": ["text"], "n": 1})
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
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


def test_json_schema_output_validates_for_twenty_requests(agent: Daemon) -> None:
    """Twenty sampled (temperature 0.8) requests, four at a time so the grammar-constrained
    sequences share the batch as real traffic would: every answer parses and validates."""
    client = agent.openai()
    rng = random.Random(7)
    people = ["a sailor", "a baker", "a child", "a painter", "an astronaut"]
    seeds = [rng.randrange(1 << 30) for _ in range(20)]

    def ask(i: int) -> tuple[str | None, str | None]:
        resp = client.chat.completions.create(
            model=SMOL, max_tokens=120, temperature=0.8, seed=seeds[i],
            messages=[{"role": "user", "content": f"Describe {people[i % 5]} as JSON."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": SCHEMA,
                                             "strict": True}},
        )
        return resp.choices[0].finish_reason, resp.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(20)))
    for finish_reason, content in answers:
        assert finish_reason == "stop", content
        jsonschema.validate(json.loads(content or ""), SCHEMA)


def test_a_schema_without_a_grammar_is_refused(agent: Daemon) -> None:
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": CHAT, "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"$ref": "https://example.com/elsewhere.json"}}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format")


def test_strict_refuses_a_keyword_the_grammar_cannot_enforce(agent: Daemon) -> None:
    """strict: true promises replies that validate: a number's bounds have no grammar, so
    the schema gets a 400 naming the keyword and where it is. Without strict the rest of
    the schema is enforced and the keyword is best effort, as with OpenAI."""
    schema = {"type": "object", "properties": {"price": {"type": "number", "minimum": 0}},
              "required": ["price"], "additionalProperties": False}

    def ask(strict: bool) -> Any:
        return _post(agent, "/v1/chat/completions", {
            "model": SMOL, "messages": CHAT, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": schema, "strict": strict}}})

    r = ask(True)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert '"minimum" at /properties/price' in r.json()["error"]["message"]
    assert ask(False).status_code == 200
    r = _post(agent, "/v1/responses", {
        "model": SMOL, "input": "Name a price.", "max_output_tokens": 4,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": schema,
                            "strict": True}}})
    assert r.status_code == 400 and "minimum" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 100_000},  # killed the daemon: SIGSEGV in llama.cpp
    {"type": "array", "items": {"type": "integer"}, "maxItems": 2000},  # no sampler
])
def test_a_schema_whose_grammar_would_crash_llama_cpp_is_refused(
    agent: Daemon, schema: dict[str, Any]
) -> None:
    """Found by the API fuzzer: the grammar converter nests maxLength N groups N deep and
    llama.cpp parses them recursively. Refused with a 400 that names the limit — as a
    response format and as a tool's parameters — and the daemon keeps answering."""
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": CHAT, "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                   "schema": schema}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert "at most 1000" in r.json()["error"]["message"] \
        or "cannot use the grammar" in r.json()["error"]["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": schema}, "required": ["x"]}}}
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": CHAT, "max_tokens": 4, "tools": [tool],
        "tool_choice": "required"})
    assert r.status_code == 400, r.text
    ok = _post(agent, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "max_tokens": 2})
    assert ok.status_code == 200


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def _valid_call(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    args: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_a_named_tool_is_called_with_valid_arguments_and_the_result_gets_an_answer(
    agent: Daemon
) -> None:
    client = agent.openai()
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=SMOL, messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice=named, max_tokens=64, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    args = _valid_call(call, WEATHER)
    # The app runs the tool and sends the result back; the model answers from it.
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"city": args["city"], "forecast": "sunny, 24 C"})}]
    final = client.chat.completions.create(model=SMOL, messages=history, tools=[WEATHER],
                                           tool_choice="none", max_tokens=48, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content.strip()
    assert not final.choices[0].message.tool_calls
    # Under "auto" the model may answer or call again: either way the reply is well formed.
    auto = client.chat.completions.create(model=SMOL, messages=history, tools=[WEATHER],
                                          max_tokens=64, temperature=0)
    msg = auto.choices[0].message
    if msg.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        _valid_call(msg.tool_calls[0], WEATHER)
    else:
        assert msg.content and auto.choices[0].finish_reason == "stop"


def test_required_picks_one_of_the_tools_and_streams_it_as_deltas(agent: Daemon) -> None:
    client = agent.openai()
    stream = client.chat.completions.create(model=SMOL, messages=ASK, tools=[WEATHER, TIME],
                                            tool_choice="required", max_tokens=64,
                                            temperature=0, stream=True)
    role, calls, finish = None, {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        role = role or delta.role
        for c in delta.tool_calls or []:
            calls.setdefault(c.index, c)
        finish = chunk.choices[0].finish_reason or finish
    assert role == "assistant" and finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    tool = WEATHER if call.function.name == "get_weather" else TIME
    _valid_call(call, tool)


def test_legacy_functions_and_bad_tool_choices(agent: Daemon) -> None:
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": ASK, "max_tokens": 64, "temperature": 0,
        "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}})
    assert r.status_code == 200, r.text
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        WEATHER["function"]["parameters"])
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": ASK, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = _post(agent, "/v1/chat/completions", {
        "model": SMOL, "messages": ASK, "tools": [WEATHER],
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"



def test_parallel_tool_calls(agent: Daemon) -> None:
    body = {"model": SMOL, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 96,
            "tool_choice": "required", "temperature": 0}
    one = _post(agent, "/v1/chat/completions", {**body, "parallel_tool_calls": False}).json()
    assert len(one["choices"][0]["message"]["tool_calls"]) == 1
    many = _post(agent, "/v1/chat/completions", {**body, "parallel_tool_calls": True}).json()
    calls = many["choices"][0]["message"]["tool_calls"]
    assert calls and all(c["function"]["name"] in ("get_weather", "get_time") for c in calls)


def test_the_end_user_is_in_the_audit_record_and_the_tier_is_echoed(agent: Daemon) -> None:
    r = _post(agent, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "max_tokens": 2,
                                              "user": "kiosk-7", "service_tier": "default"})
    assert r.status_code == 200 and r.json()["service_tier"] == "default"
    r = _post(agent, "/v1/completions", {"model": SMOL, "prompt": "Hi", "max_tokens": 2,
                                         "safety_identifier": "hash-of-user-9"})
    assert r.status_code == 200
    with agent.client() as c:
        records = c.get("/agent/v1/audit", params={"n": 20}).json()["records"]
    users = [r["details"].get("end_user") for r in records]
    assert "kiosk-7" in users and "hash-of-user-9" in users


def test_n_choices_share_the_prompt_and_each_has_its_index(agent: Daemon) -> None:
    # llama.cpp's server suite expects n: 2 to work; sampled, so the choices may differ.
    body = {"model": SMOL, "messages": CHAT, "n": 2, "max_tokens": 12, "temperature": 1.0,
            "seed": 5}
    r = _post(agent, "/v1/chat/completions", body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert all(c["message"]["content"] for c in r["choices"])
    assert r["usage"]["completion_tokens"] <= 24 and r["usage"]["prompt_tokens"] > 0
    again = _post(agent, "/v1/chat/completions", body).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in r["choices"]]
    # Streamed completions: every event names its choice; each choice ends once.
    with agent.client() as c, c.stream("POST", "/v1/completions", json={
            "model": SMOL, "prompt": "Once upon a time", "n": 3, "max_tokens": 6,
            "temperature": 0.9, "stream": True}) as resp:
        events = [e for e in sse_events(resp.iter_lines()) if isinstance(e, dict)]
    text = {i: "".join(e["choices"][0]["text"] for e in events
                       if e["choices"] and e["choices"][0]["index"] == i) for i in range(3)}
    ends = [e["choices"][0]["index"] for e in events
            if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(ends) == [0, 1, 2] and all(text.values())
    # More choices than the model has sequences, or with tools: refused by name.
    r = _post(agent, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = _post(agent, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "n": 2,
                                              "tools": [{"type": "function",
                                                         "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


# -- every parameter of the official client: an observed effect, or refused ------------

PROMPTS = {  # (chat message, completion prompt)
    "list": ("List ten fruits, separated by commas.",
             "Colours: red, green, blue, red, green, blue,"),
    "free": ("Tell me about the sea.", "The best thing about the sea is"),
}
# name -> (prompt, what both requests share, what the second changes, what must differ)
PAIRS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "temperature": ("free", {"temperature": 0, "seed": 1}, {"temperature": 1.9}, "text"),
    "top_p": ("free", {"temperature": 1.6, "seed": 3, "top_p": 1.0}, {"top_p": 0.001},
              "text"),
    "seed": ("free", {"temperature": 1.3, "seed": 1}, {"seed": 2}, "text"),
    "frequency_penalty": ("list", {"temperature": 0, "frequency_penalty": 0},
                          {"frequency_penalty": 2.0}, "text"),
    "presence_penalty": ("list", {"temperature": 0, "presence_penalty": 0},
                         {"presence_penalty": 2.0}, "text"),
    "stop": ("list", {"temperature": 0}, {"stop": [",", "\n"]}, "text"),
    "max_tokens": ("free", {"temperature": 0, "max_tokens": 4}, {"max_tokens": 9}, "tokens"),
    "max_completion_tokens": ("free", {"temperature": 0, "max_completion_tokens": 4},
                              {"max_completion_tokens": 9}, "tokens"),
}
COVERED = {  # name -> the test that observes its effect
    "messages": "test_typed_text_parts_are_joined_as_llama_cpp_joins_them",
    "prompt": "test_completion_stream_ends_with_an_empty_finish_chunk",
    "model": "test_models_retrieve_and_the_routes_without_v1",
    "logit_bias": "test_logit_bias_bans_a_token",
    "response_format": "test_json_schema_output_validates_for_twenty_requests",
    "stream_options": "test_openai_client_chat_streaming",  # tests/test_serve.py
    "tools": "test_a_named_tool_is_called_with_valid_arguments_and_the_result_gets_an_answer",
    "tool_choice": "test_required_picks_one_of_the_tools_and_streams_it_as_deltas",
    "functions": "test_legacy_functions_and_bad_tool_choices",
    "function_call": "test_legacy_functions_and_bad_tool_choices",
    "parallel_tool_calls": "test_parallel_tool_calls",
    "user": "test_the_end_user_is_in_the_audit_record_and_the_tier_is_echoed",
    "safety_identifier": "test_the_end_user_is_in_the_audit_record_and_the_tier_is_echoed",
    "service_tier": "test_the_end_user_is_in_the_audit_record_and_the_tier_is_echoed",
    "n": "test_n_choices_share_the_prompt_and_each_has_its_index",
    "logprobs": "test_chat_logprobs_are_the_models_own_and_match_the_text",
    "top_logprobs": "test_chat_logprobs_are_the_models_own_and_match_the_text",
}


def _client_params() -> dict[str, set[str]]:
    import typing

    from openai.types import completion_create_params as comp
    from openai.types.chat import completion_create_params as chat

    return {"/v1/chat/completions": set(typing.get_type_hints(chat.CompletionCreateParamsBase)),
            "/v1/completions": set(typing.get_type_hints(comp.CompletionCreateParamsBase))}


def test_every_parameter_of_the_official_client_is_decided() -> None:
    """A new client version with a new parameter fails here until it is implemented (with
    a test of its effect) or refused."""
    here = (Path(__file__).read_text()
            + Path(__file__).with_name("test_serve.py").read_text())
    for path, params in _client_params().items():
        refused = {n for p, n, _ in REFUSED if p == path}
        undecided = params - refused - set(PAIRS) - set(COVERED)
        assert not undecided, f"{path}: no decision for {sorted(undecided)}"
    for name, test in COVERED.items():
        assert f"def {test}(" in here, f"{name}: {test} does not exist"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_sampling_parameter_changes_what_is_generated(agent: Daemon, path: str,
                                                        name: str) -> None:
    if name not in _client_params()[path]:
        pytest.skip(f"{name} is not a parameter of {path}")
    prompt, same, changed, what = PAIRS[name]
    chat, completion = PROMPTS[prompt]
    base: dict[str, Any] = {"model": SMOL, "max_tokens": 24, **same}
    base.update({"messages": [{"role": "user", "content": chat}]} if "chat" in path
                else {"prompt": completion})
    a, b = (_post(agent, path, body).json() for body in (base, {**base, **changed}))
    if what == "tokens":
        assert a["usage"]["completion_tokens"] != b["usage"]["completion_tokens"], (a, b)
    else:
        def text(r: dict[str, Any]) -> str:
            c = r["choices"][0]
            return str(c["message"]["content"] if "message" in c else c["text"])

        assert text(a) != text(b), (name, text(a))



def test_chat_logprobs_are_the_models_own_and_match_the_text(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=12,
                                          temperature=0, logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
        # Greedy: the token chosen is the likeliest one.
        assert t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob
    # Streamed: the same tokens, spread over the chunks that carry their text.
    stream = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=12,
                                            temperature=0, logprobs=True, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    r = _post(agent, "/v1/chat/completions", {"model": SMOL, "messages": CHAT,
                                              "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_completion_logprobs_agree_with_llama_cpp_python(agent: Daemon,
                                                         smollm2_gguf: Path) -> None:
    from llama_cpp import Llama

    from agent.runtime.llama import extra_buffers_are_safe, model_params

    prompt = "The capital of France is"
    ours = _post(agent, "/v1/completions", {"model": SMOL, "prompt": prompt, "max_tokens": 8,
                                            "temperature": 0, "logprobs": 2}).json()
    lp = ours["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == ours["choices"][0]["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    # The baseline: llama-cpp-python's own logprobs (every position's logits kept), with
    # flash attention on as the agent runs it (runtime.flash_attention auto): the unfused
    # kernel's logits differ in the last digits, enough to flip a near-tie.
    with model_params(use_extra_bufts=extra_buffers_are_safe()):  # as the agent loads
        llm = Llama(str(smollm2_gguf), logits_all=True, n_ctx=512, verbose=False,
                    flash_attn=True)
    theirs = llm.create_completion(prompt, max_tokens=8, temperature=0, logprobs=2)
    base = theirs["choices"][0]["logprobs"]
    assert lp["tokens"] == base["tokens"]
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], base["token_logprobs"],
                                          strict=True)) < 0.05


def test_prompts_as_strings_and_token_ids_give_one_choice_each(agent: Daemon,
                                                               smollm2_gguf: Path) -> None:
    from llama_cpp import Llama

    body = {"model": SMOL, "max_tokens": 6, "temperature": 0}
    prompts = ["The capital of France is", "Once upon a time"]
    singles = [_post(agent, "/v1/completions", {**body, "prompt": p}).json() for p in prompts]
    both = _post(agent, "/v1/completions", {**body, "prompt": prompts}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert both["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"]
                                                     for s in singles)
    # Token ids: the same tokens as the text gives the same continuation.
    vocab = Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    ids = [vocab.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
    one = _post(agent, "/v1/completions", {**body, "prompt": ids[0]}).json()
    assert one["choices"][0]["text"] == singles[0]["choices"][0]["text"]
    many = _post(agent, "/v1/completions", {**body, "prompt": ids}).json()
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in both["choices"]]
    # Streamed: each prompt's chunks under its index, each with its own finish.
    chunks = _stream(agent, "/v1/completions", {**body, "prompt": prompts})
    for i, single in enumerate(singles):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == single["choices"][0]["text"]
        assert mine[-1]["finish_reason"] == "length"
    bad = _post(agent, "/v1/completions", {**body, "prompt": [10 ** 8]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    bad = _post(agent, "/v1/completions", {**body, "prompt": ["x"] * 17})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("prompt")


def test_the_responses_api_answers_streams_and_follows_a_schema(agent: Daemon) -> None:
    client = agent.openai()
    resp = client.responses.create(model=SMOL, input="Name three colours.",
                                   instructions="Answer in one short sentence.",
                                   max_output_tokens=24, temperature=0)
    assert resp.object == "response" and resp.status in ("completed", "incomplete")
    assert resp.output_text.strip()
    assert resp.usage.output_tokens <= 24 and resp.usage.input_tokens > 0
    # The same through chat completions: the same text (the same messages, greedy).
    chat = client.chat.completions.create(
        model=SMOL, max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "Answer in one short sentence."},
                  {"role": "user", "content": "Name three colours."}])
    assert resp.output_text == chat.choices[0].message.content
    # Streamed: typed events in order; the deltas make the final text.
    events = list(client.responses.create(model=SMOL, input="Name three colours.",
                                          instructions="Answer in one short sentence.",
                                          max_output_tokens=24, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == resp.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Input messages and a JSON Schema for the text.
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    structured = client.responses.create(
        model=SMOL, max_output_tokens=32,
        input=[{"role": "user", "content": [{"type": "input_text",
                                             "text": "Pick a colour, as JSON."}]}],
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
    jsonschema.validate(json.loads(structured.output_text), schema)
    r = _post(agent, "/v1/responses", {"model": SMOL, "input": "Hi",
                                       "previous_response_id": "resp_123"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


# -- llama.cpp's server suite, the model-agnostic cases on the OpenAI routes ------------
# From tools/server/tests/unit/test_chat_completion.py in the llama.cpp sources vendored by
# the pinned llama-cpp-python, run here through the socket against SmolLM2 (their fixture
# is a tinyllama with exact-text expectations; the properties they check are kept):
#   test_invalid_chat_completion_req      -> test_llama_suite_invalid_chat_requests
#   test_chat_completion_stream           -> test_llama_suite_stream_invariants
#   test_chat_completion_with_openai_library, test_logprobs, test_logprobs_stream
#                                         -> test_llama_suite_openai_library_and_logprobs
#   test_completion_with_response_format  -> test_llama_suite_response_formats
# Not taken: exact-text and exact-token-count cases (model-specific), /apply-template,
# "__verbose", timings_per_token, the "grammar" and top-level "json_schema" extensions
# (llama-server's own, not OpenAI's), and their case of two assistant turns in a row,
# which OpenAI's API accepts and so do we.

@pytest.mark.parametrize("messages", [
    None, "string", [123], [{}], [{"role": 123}], [{"role": "system", "content": 123}],
    [{"role": "system", "content": "test"}, {}],
], ids=["none", "string", "int", "empty", "role-int", "content-int", "second-empty"])
def test_llama_suite_invalid_chat_requests(agent: Daemon, messages: object) -> None:
    r = _post(agent, "/chat/completions", {"model": SMOL, "messages": messages})
    assert r.status_code == 400 and "error" in r.json()


def test_llama_suite_stream_invariants(agent: Daemon) -> None:
    chunks = _stream(agent, "/chat/completions", {
        "model": SMOL, "max_tokens": 8, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "Book"},
                     {"role": "user", "content": "What is the best book"}]})
    assert len({c["id"] for c in chunks}) == 1
    content = ""
    for i, c in enumerate(chunks):
        if not c["choices"]:
            assert c["usage"]["completion_tokens"] == 8 and c["usage"]["prompt_tokens"] > 0
            continue
        choice = c["choices"][0]
        assert ("role" in choice["delta"]) == (i == 0)
        if choice["finish_reason"] is not None:
            assert "content" not in choice["delta"] and choice["finish_reason"] == "length"
        else:
            content += choice["delta"].get("content") or ""
    assert content


def test_llama_suite_openai_library_and_logprobs(agent: Daemon) -> None:
    client = agent.openai()
    book = [{"role": "system", "content": "Book"},
            {"role": "user", "content": "What is the best book"}]
    res = client.chat.completions.create(model=SMOL, messages=book, max_tokens=8, seed=42,
                                         temperature=0.8)
    assert res.choices[0].finish_reason == "length" and res.choices[0].message.content
    res = client.chat.completions.create(model=SMOL, messages=book, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=10)
    assert "".join(t.token for t in res.choices[0].logprobs.content) == \
        res.choices[0].message.content
    assert all(t.logprob <= 0 and t.bytes is not None and t.top_logprobs
               for t in res.choices[0].logprobs.content)
    output = aggregated = ""
    for data in client.chat.completions.create(model=SMOL, messages=book, max_tokens=5,
                                               temperature=0, logprobs=True,
                                               top_logprobs=10, stream=True):
        choice = data.choices[0]
        if choice.finish_reason is None and choice.delta.content:
            output += choice.delta.content
            aggregated += "".join(t.token for t in choice.logprobs.content)
    assert aggregated == output


@pytest.mark.parametrize(("response_format", "expect"), [
    ({"type": "json_schema", "json_schema": {"schema": {"const": "foooooo"}}}, '"foooooo"'),
    ({"type": "json_object"}, None),
    ({"type": "sound"}, 400),
    ({"type": "json_schema", "json_schema": {"schema": 123}}, 400),
])
def test_llama_suite_response_formats(agent: Daemon, response_format: dict[str, Any],
                                      expect: str | int | None) -> None:
    r = _post(agent, "/chat/completions", {
        "model": SMOL, "max_tokens": 10, "response_format": response_format,
        "messages": [{"role": "system", "content": "You are a coding assistant."},
                     {"role": "user", "content": "Write an example"}]})
    if expect == 400:
        assert r.status_code == 400 and "error" in r.json()
        return
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    if expect is None:
        assert content.lstrip().startswith("{")
    else:
        assert content == expect
