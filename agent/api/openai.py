"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from agent.api import bodies
from agent.api import tools as tooling
from agent.api.access import END_USER, MODEL, USAGE
from agent.api.errors import APIError, to_api_error
from agent.api.limits import EventStream
from agent.api.routes import RouteSpec
from agent.api.tasks import check_route
from agent.runtime.types import ChatMessage, Chunk, GenerationRequest, Sampling
from agent.state import STATE
from registry.service import ALIAS_RE

log = logging.getLogger(__name__)
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _checked_keep_alive(value: float | str | None) -> float | str | None:
    parse_keep_alive(value)
    return value


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama-style keep_alive: seconds, or "10m"/"1h"/"0"; negative keeps it forever."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.fullmatch(value.strip())
    if not m:
        raise ValueError("keep_alive must be seconds or a duration like '30s', '5m', '1h'")
    return float(m.group(1)) * _UNIT[m.group(2)]


# Checked where the request is read: a bad value is a 400 naming keep_alive.
KeepAlive = Annotated[float | str | None, AfterValidator(_checked_keep_alive)]
# What a request may name as its model: an alias as the registry makes them, so nothing
# else (control characters, 900 KB names) reaches a handler or the audit log.
ModelAlias = Annotated[str, Field(min_length=1, max_length=64, pattern=ALIAS_RE.pattern)]


# Request fields of OpenAI's API that change what is generated and that edge-agent does not
# implement yet: refused with a 400 naming the field when set to anything but their
# "off" value, never silently ignored. (What is accepted: the request models below.)
_NOT_IMPLEMENTED: dict[str, tuple[str, tuple[object, ...]]] = {
    # name: (what it asks for, the values that ask for nothing)
    "echo": ("echoing the prompt", (None, False)),
    "suffix": ("suffix insertion", (None, "")),
    "best_of": ("best-of sampling", (None, 1)),
    "audio": ("audio output", (None,)),
    "modalities": ("non-text output", (None, ("text",))),
    "prediction": ("predicted outputs", (None,)),
    "web_search_options": ("web search", (None,)),
    "reasoning_effort": ("reasoning effort (no reasoning models here)", (None,)),
    "verbosity": ("verbosity control", (None,)),
    "store": ("storing completions", (None, False)),
    "metadata": ("metadata for stored completions", (None, {})),
    "moderation": ("moderation", (None,)),
    "prompt_cache_key": ("prompt-cache hints", (None,)),
    "prompt_cache_options": ("prompt-cache hints", (None,)),
    "prompt_cache_retention": ("prompt-cache hints", (None,)),
    "service_tier": ("service tiers other than the one there is", (None, "auto", "default")),
}


def _is_off(value: object, off: tuple[object, ...]) -> bool:
    if isinstance(value, list):
        value = tuple(value)
    # By type as well as value: True == 1 and False == 0 in Python.
    return any(type(value) is type(o) and value == o for o in off)


def refuse_unimplemented(body: Any,
                         table: dict[str, tuple[str, tuple[object, ...]]] | None = None) -> None:
    """400 for a request that asks for something this server does not do (an app must
    not find out in production that a parameter was dropped). `table`: name → (what it
    asks for, its "off" values); default: the completions routes' table."""
    if not isinstance(body, dict):
        return
    for name, (what, off) in (_NOT_IMPLEMENTED if table is None else table).items():
        if name in body and not _is_off(body[name], off):
            raise APIError(400, f"{name}: {what} is not supported by edge-agent; leave "
                           f"`{name}` unset", param=name, code="unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = None


def join_text_parts(parts: list[ContentPart], where: str, kinds: tuple[str, ...]) -> str:
    """Typed text parts joined with a newline, as llama.cpp's chat code joins them; any
    other part (an image, audio) is a 400 naming it (`where`: e.g. "messages.0")."""
    texts = []
    for j, part in enumerate(parts):
        if part.type not in kinds or part.text is None:
            what = "images" if part.type in ("image_url", "input_image") \
                else f"{part.type!r} parts"
            head, _, tail = where.partition(".")
            raise APIError(400, f"{head}[{tail}].content[{j}]: the models here take text "
                           f"only, not {what}", param=f"{where}.content.{j}.type",
                           code="unsupported_content")
        texts.append(part.text)
    return "\n".join(texts)


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[tooling.CallIn] | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=128)

    def to_model(self, index: int) -> ChatMessage:
        """This turn as the model sees it (tool calls and results included)."""
        if self.role == "assistant" and self.tool_calls:
            return ChatMessage(role="assistant",
                               content=tooling.assistant_calls(self.tool_calls, index))
        if self.role == "tool":
            return tooling.tool_result(self.to_message(index).content, self.tool_call_id)
        return self.to_message(index)

    def to_message(self, index: int) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = join_text_parts(content, f"messages.{index}", ("text",))
        return ChatMessage(role=self.role, content=content or "")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(default="response", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _CommonRequest(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, like
    # llama.cpp's server does; fields we know are validated strictly.
    model_config = ConfigDict(extra="ignore")

    model: ModelAlias
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    ignore_eos: bool | None = None  # llama.cpp's: generate exactly max_tokens
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16, description="Choices to generate: parallel "
                   "sequences sharing the prompt's evaluation (at most runtime.parallel).")
    keep_alive: KeepAlive = None
    cache_prompt: bool | None = Field(
        default=None, description="llama.cpp's: reuse a cached prompt prefix (default: "
        "yes, unless temperature is 0 or `seed` is set: those ask for the same text every "
        "time, which a prefix evaluated in another batch shape does not guarantee).")
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    # The app's end user, for its own abuse tracing: recorded in the audit record.
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit() or len(token) > 9:
                raise ValueError(f"keys are token ids, got {token[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100, got {bias}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings")
        return v

    def logprob_count(self) -> int | None:
        """How many alternatives per token to report (None: no log-probabilities)."""
        return None

    def sampling(self, json_object: bool = False, json_schema: str | None = None,
                 strict: bool = False) -> Sampling:
        fields = {
            k: getattr(self, k)
            for k in (
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repeat_penalty",
                "presence_penalty",
                "frequency_penalty",
                "seed",
                "ignore_eos",
            )
            if getattr(self, k) is not None
        }
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        return Sampling(**fields, stop=stops, json_object=json_object, json_schema=json_schema,
                        json_schema_strict=strict, logit_bias=bias,
                        logprobs=self.logprob_count())


class _LegacyCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class ChatCompletionRequest(_CommonRequest):
    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[tooling.ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: tooling.ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[tooling.FunctionDef] | None = Field(default=None, max_length=128)
    function_call: Literal["none", "auto"] | _LegacyCall | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                           code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_plan(self) -> tooling.ToolPlan | None:
        """What the tools (or the legacy functions) ask of the reply, if anything."""
        tools, choice = self.tools, self.tool_choice
        if self.functions is not None:
            tools = [tooling.ToolDef(function=f) for f in self.functions]
            fc = self.function_call
            choice = (tooling.NamedChoice(function=tooling._Named(name=fc.name))
                      if isinstance(fc, _LegacyCall) else fc)
        p = tooling.plan(tools, choice, self.parallel_tool_calls)
        if p is not None and self.n > 1:
            raise APIError(400, "n above 1 cannot be combined with tools", param="n",
                           code="invalid_value")
        if p is not None and self.logprobs:
            raise APIError(400, "logprobs cannot be combined with tools (the reply is "
                           "rewritten from the JSON the model writes)", param="logprobs",
                           code="invalid_value")
        if p is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise APIError(400, "response_format cannot be combined with tools (the reply is "
                           "already JSON)", param="response_format", code="invalid_value")
        return p

    def generation(self, tools: tooling.ToolPlan | None = None) -> GenerationRequest:
        if self.max_completion_tokens is not None:  # the newer name wins over max_tokens
            self.max_tokens = self.max_completion_tokens
        fmt = self.response_format
        json_object = fmt is not None and fmt.type == "json_object"
        schema = None
        strict = False
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format: type json_schema needs a json_schema "
                               "with a schema", param="response_format.json_schema",
                               code="invalid_value")
            schema = json.dumps(fmt.json_schema.schema_)
            strict = bool(fmt.json_schema.strict)
        messages = [m.to_model(i) for i, m in enumerate(self.messages)]
        if tools is not None:
            messages = tooling.with_tools(messages, tools)
            schema = json.dumps(tools.schema)
        return GenerationRequest(
            model=self.model,
            messages=messages,
            sampling=self.sampling(json_object, schema, strict),
            keep_alive=parse_keep_alive(self.keep_alive),
            cache_prompt=self.cache_prompt,
            n=self.n,
        )


MAX_PROMPTS = 16  # prompts in one /v1/completions request (each is generated in turn)


class CompletionRequest(_CommonRequest):
    # OpenAI's four forms: a string, strings, token ids, lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("at least one prompt")
            many = isinstance(v[0], str | list)
            if many and len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("a token-id prompt needs at least one token")
        return v

    def generations(self) -> list[GenerationRequest]:
        """One generation per prompt, in order (their choices' indexes)."""
        p = self.prompt
        one = isinstance(p, str) or (bool(p) and isinstance(p[0], int))
        prompts: list[Any] = [p] if one else list(p)
        sampling = self.sampling()
        return [GenerationRequest(
            model=self.model,
            prompt=x if isinstance(x, str) else None,
            prompt_ids=None if isinstance(x, str) else list(x),
            sampling=sampling,
            keep_alive=parse_keep_alive(self.keep_alive),
            cache_prompt=self.cache_prompt,
            n=self.n,
        ) for x in prompts]

    def generation(self) -> GenerationRequest:
        return self.generations()[0]


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 413 above the size limit, 400 when malformed."""
    # Like llama.cpp's server, any content type is accepted: curl -d sends form encoding.
    return bodies.loads(await request.read())  # aiohttp enforces client_max_size here


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # One indexed read on a WAL reader (tens of µs): cheaper inline than a thread hop.
    data = [
        {"id": alias, "object": "model", "created": int(created.timestamp()),
         "owned_by": "edge-agent"}
        for alias, created in state.registry.model_ids()
    ]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}` (the client's `models.retrieve`)."""
    state = request.app[STATE]
    alias = request.match_info["model"]
    for name, created in state.registry.model_ids():
        if name == alias:
            return web.json_response({"id": name, "object": "model",
                                      "created": int(created.timestamp()),
                                      "owned_by": "edge-agent"})
    raise APIError(404, f"model {alias[:64]!r} is not installed", param="model",
                   code="model_not_found")


class _Usage:
    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        self.cached = 0
        self._choices: dict[int, int] = {}  # completion tokens of each of the n choices

    def update(self, chunk: Chunk) -> None:
        if chunk.prompt_tokens is not None:
            self.prompt = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self._choices[chunk.index] = chunk.completion_tokens
            self.completion = sum(self._choices.values())
        if chunk.cached_tokens is not None:
            self.cached = chunk.cached_tokens

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's usage object; prompt tokens taken from the prefix cache are counted in
        prompt_tokens_details.cached_tokens, as OpenAI reports its own prompt caching."""
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    refuse_unimplemented(body)
    req = ChatCompletionRequest.model_validate(body)
    plan = req.tool_plan()
    gen = req.generation(plan)
    await check_route(request, req.model, "chat")
    return await _serve(request, req, gen, chat=True, tools=plan)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    refuse_unimplemented(body)
    req = CompletionRequest.model_validate(body)
    gens = req.generations()
    await check_route(request, req.model, "completions")
    if len(gens) > 1:
        return await _serve_many(request, req, gens)
    return await _serve(request, req, gens[0], chat=False)


async def _serve_many(request: web.Request, req: CompletionRequest,
                      gens: list[GenerationRequest]) -> web.StreamResponse:
    """Several prompts: generated one after another (each admitted on its own), `n` choices
    each, usage summed; streamed as chunks whose choice index is prompt × n + choice (as
    OpenAI numbers them)."""
    state = request.app[STATE]
    request[MODEL] = req.model
    rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            **_tier(req)}
    wanted = req.logprob_count() is not None
    totals = _Usage()
    resp: web.StreamResponse | None = None
    choices: list[dict[str, Any]] = []

    async def write(payload: dict[str, Any]) -> None:
        assert resp is not None
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    n = req.n
    for p_index, gen in enumerate(gens):
        usage = _Usage()
        parts: dict[int, list[str]] = {i: [] for i in range(n)}
        probs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(n)}
        finish = dict.fromkeys(range(n), "stop")
        stream = state.scheduler.generate(gen)
        try:
            async for chunk in stream:
                if resp is None and req.stream:  # the first chunk is here: errors had their
                    resp = EventStream(request)  # status; now the stream starts
                    await resp.prepare(request)
                usage.update(chunk)
                i = chunk.index
                finish[i] = chunk.finish_reason or finish[i]
                if req.stream and (chunk.text or chunk.finish_reason):
                    lp = (_completion_logprobs(chunk.logprobs or [], len("".join(parts[i])))
                          if wanted else None)
                    await write({**head, "choices": [{"index": p_index * n + i,
                                                      "text": chunk.text,
                                                      "finish_reason": chunk.finish_reason,
                                                      "logprobs": lp}]})
                parts[i].append(chunk.text)
                probs[i].extend(chunk.logprobs or ())
        finally:
            await stream.aclose()
        totals.prompt += usage.prompt
        totals.completion += usage.completion
        totals.cached += usage.cached
        choices.extend({"index": p_index * n + i, "text": "".join(parts[i]),
                        "finish_reason": finish[i],
                        "logprobs": _completion_logprobs(probs[i], 0) if wanted else None}
                       for i in range(n))
    request[USAGE] = totals.as_dict()
    if not req.stream:
        return web.json_response({**head, "choices": choices, "usage": totals.as_dict()})
    assert resp is not None
    if req.stream_options is not None and req.stream_options.include_usage:
        await write({**head, "choices": [], "usage": totals.as_dict()})
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _serve(
    request: web.Request, req: _CommonRequest, gen: GenerationRequest, *, chat: bool,
    tools: tooling.ToolPlan | None = None,
) -> web.StreamResponse:
    state = request.app[STATE]
    request[MODEL] = gen.model  # for the audit record
    end_user = req.safety_identifier or req.user
    if end_user is not None:
        request[END_USER] = end_user
    if state.settings.logging.log_content:  # off by default: prompts are private
        log.info("content: %s prompt %r", gen.model, gen.messages or gen.prompt)
    stream = state.scheduler.generate(gen)
    try:
        # Pull the first chunk before answering, so 404/400/429/503 get a proper status.
        first = await anext(stream)
    except StopAsyncIteration:
        first = Chunk(finish_reason="stop")
    except BaseException:
        await stream.aclose()
        raise
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    reply = _Reply(request, req, stream, first, rid, created, chat)
    try:
        if tools is not None:
            return await _tool_reply(reply)
        return await (_stream(reply) if req.stream else _collect(reply))
    finally:
        await stream.aclose()  # stops generation if the client went away


@dataclass(frozen=True, slots=True)
class _Reply:
    """One response in the making: the request, its chunk stream and the ids it carries."""

    request: web.Request
    req: _CommonRequest
    stream: AsyncIterator[Chunk]
    first: Chunk  # pulled before answering, so errors get a proper status
    rid: str
    created: int
    chat: bool


async def _collect(reply: _Reply) -> web.Response:
    request, req, stream, first, rid, created, chat = (
        reply.request, reply.req, reply.stream, reply.first, reply.rid, reply.created, reply.chat
    )
    usage = _Usage()
    parts: dict[int, list[str]] = {i: [] for i in range(req.n)}
    probs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(req.n)}
    finish: dict[int, str] = {}
    chunk: Chunk | None = first
    while chunk is not None:
        usage.update(chunk)
        parts.setdefault(chunk.index, []).append(chunk.text)
        probs.setdefault(chunk.index, []).extend(chunk.logprobs or ())
        if chunk.finish_reason:
            finish[chunk.index] = chunk.finish_reason
        chunk = await anext(stream, None)
    wanted = req.logprob_count() is not None
    request[USAGE] = usage.as_dict()
    choices: list[dict[str, Any]] = []
    for i in sorted(parts):
        text = "".join(parts[i])
        if request.app[STATE].settings.logging.log_content:
            log.info("content: %s completion %r", req.model, text)
        if chat:
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish.get(i, "stop"),
                "logprobs": _chat_logprobs(probs[i]) if wanted else None,
            })
        else:
            choices.append({"index": i, "text": text, "finish_reason": finish.get(i, "stop"),
                            "logprobs": _completion_logprobs(probs[i], 0) if wanted else None})
    return web.json_response(
        {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": req.model,
            **_tier(req),
            "choices": choices,
            "usage": usage.as_dict(),
        }
    )


def _chat_logprobs(probs: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    return {"content": probs, "refusal": None}


def _completion_logprobs(probs: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, offsets into the generated text."""
    offsets = []
    for p in probs:
        offsets.append(offset)
        offset += len(p["token"])
    return {"tokens": [p["token"] for p in probs],
            "token_logprobs": [p["logprob"] for p in probs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in p["top_logprobs"]}
                             for p in probs],
            "text_offset": offsets}


def _tier(req: _CommonRequest) -> dict[str, str]:
    """The service tier, in the response when the request named one (there is one tier)."""
    return {} if req.service_tier is None else {"service_tier": "default"}


async def _tool_reply(reply: _Reply) -> web.StreamResponse:
    """A reply under tools: the whole JSON is generated (grammar-constrained), then turned
    into `tool_calls` or content, and sent as one response or as OpenAI's deltas."""
    request, req, stream = reply.request, reply.req, reply.stream
    chunk: Chunk | None = reply.first
    usage = _Usage()
    parts: list[str] = []
    finish = "stop"
    while chunk is not None:
        usage.update(chunk)
        parts.append(chunk.text)
        finish = chunk.finish_reason or finish
        chunk = await anext(stream, None)
    request[USAGE] = usage.as_dict()
    content, calls = tooling.parse("".join(parts))
    if calls:
        finish = "tool_calls"
    head = {"id": reply.rid, "created": reply.created, "model": req.model, **_tier(req)}
    if not req.stream:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return web.json_response({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage.as_dict()})
    resp = EventStream(request)
    await resp.prepare(request)

    async def send(delta: dict[str, Any], why: str | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        choices = [] if extra else [{"index": 0, "delta": delta, "finish_reason": why,
                                     "logprobs": None}]
        payload = {**head, "object": "chat.completion.chunk", "choices": choices,
                   **(extra or {})}
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    await send({"role": "assistant", "content": ""})
    if calls:
        for i, call in enumerate(calls):
            await send({"tool_calls": [{"index": i, **call}]})
    elif content:
        await send({"content": content})
    await send({}, finish)
    if req.stream_options is not None and req.stream_options.include_usage:
        await send({}, None, {"usage": usage.as_dict()})
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _stream(reply: _Reply) -> web.StreamResponse:
    request, req, stream, first, rid, created, chat = (
        reply.request, reply.req, reply.stream, reply.first, reply.rid, reply.created, reply.chat
    )
    resp = EventStream(request)  # its writes wait at most server.write_timeout_seconds
    await resp.prepare(request)
    usage = _Usage()
    obj = "chat.completion.chunk" if chat else "text_completion"

    async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        payload = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": req.model,
            **_tier(req),
            "choices": choices,
            **(extra or {}),
        }
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": text or "", "finish_reason": finish,
                    "logprobs": None}
        delta: dict[str, Any] = {"content": text} if text else {}
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    # The per-token event differs only in its text: encode the rest once, since on a
    # 2-core device every microsecond here is taken from the model's threads.
    head = json.dumps({"id": rid, "object": obj, "created": created, "model": req.model,
                       **_tier(req)})
    key = '"delta": {"content": ' if chat else '"text": '
    tail = "}" if chat else ""
    prefixes = [f'data: {head[:-1]}, "choices": [{{"index": {i}, {key}'.encode()
                for i in range(req.n)]
    suffix = f'{tail}, "finish_reason": null, "logprobs": null}}]}}\n\n'.encode()
    if chat:  # the first delta of each choice: the role, with empty content (as OpenAI)
        for i in range(req.n):
            await send([{"index": i, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None, "logprobs": None}])
    chunk: Chunk | None = first
    wanted = req.logprob_count() is not None
    offsets = [0] * req.n  # into each generated text, for the completions' text_offset
    try:
        while chunk is not None:
            usage.update(chunk)
            i = chunk.index
            if chunk.text and wanted:  # the slow path: this chunk's tokens with the text
                probs = chunk.logprobs or []
                c = choice(i, chunk.text, None)
                c["logprobs"] = (_chat_logprobs(probs) if chat
                                 else _completion_logprobs(probs, offsets[i]))
                offsets[i] += sum(len(p["token"]) for p in probs)
                await send([c])
            elif chunk.text:
                await resp.write(prefixes[i] + json.dumps(chunk.text).encode() + suffix)
            if chunk.finish_reason is not None:  # in its own chunk, with an empty delta
                await send([choice(i, None, chunk.finish_reason)])
            chunk = await anext(stream, None)
    except Exception as exc:
        # Headers are sent: report the failure as a final event, as OpenAI's API does.
        err = to_api_error(exc) or APIError(500, "internal error", type="server_error")
        payload = {
            "error": {
                "message": err.message,
                "type": err.type,
                "param": err.param,
                "code": err.code,
            }
        }
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
    request[USAGE] = usage.as_dict()
    if req.stream_options is not None and req.stream_options.include_usage:
        await send([], {"usage": usage.as_dict()})
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


ROUTES = [
    RouteSpec(method, prefix + path, handler, permission, model_scoped=scoped)
    # Several clients call the routes without /v1 when their base URL lacks it: the same
    # handlers and permissions under both paths.
    for prefix in ("/v1", "")
    for method, path, handler, permission, scoped in (
        ("GET", "/models", list_models, "models:read", False),
        ("GET", "/models/{model}", get_model, "models:read", False),
        ("POST", "/chat/completions", chat_completions, "inference:invoke", True),
        ("POST", "/completions", completions, "inference:invoke", True),
    )
]
