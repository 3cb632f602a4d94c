"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.api.access import MODEL, USAGE
from agent.api.errors import APIError, to_api_error
from agent.api.routes import RouteSpec
from agent.runtime.types import ChatMessage, Chunk, GenerationRequest, Sampling
from agent.state import STATE

log = logging.getLogger(__name__)
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama-style keep_alive: seconds, or "10m"/"1h"/"0"; negative keeps it forever."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.fullmatch(value.strip())
    if not m:
        raise ValueError("keep_alive must be seconds or a duration like '30s', '5m', '1h'")
    return float(m.group(1)) * _UNIT[m.group(2)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def to_message(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return ChatMessage(role=self.role, content=content or "")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _CommonRequest(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, like
    # llama.cpp's server does; fields we know are validated strictly.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
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
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is generated.")
    keep_alive: float | str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings")
        return v

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: float | str | None) -> float | str | None:
        parse_keep_alive(v)
        return v

    def sampling(self, json_object: bool = False) -> Sampling:
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
            )
            if getattr(self, k) is not None
        }
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return Sampling(**fields, stop=stops, json_object=json_object)


class ChatCompletionRequest(_CommonRequest):
    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None

    def generation(self) -> GenerationRequest:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        json_object = (
            self.response_format is not None and self.response_format.type == "json_object"
        )
        return GenerationRequest(
            model=self.model,
            messages=[m.to_message() for m in self.messages],
            sampling=self.sampling(json_object),
            keep_alive=parse_keep_alive(self.keep_alive),
        )


class CompletionRequest(_CommonRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported")
        return v

    def generation(self) -> GenerationRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return GenerationRequest(
            model=self.model,
            prompt=prompt,
            sampling=self.sampling(),
            keep_alive=parse_keep_alive(self.keep_alive),
        )


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 413 above the size limit, 400 when malformed."""
    # Like llama.cpp's server, any content type is accepted: curl -d sends form encoding.
    body = await request.read()  # aiohttp enforces client_max_size here
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # One indexed read on a WAL reader (tens of µs): cheaper inline than a thread hop.
    data = [
        {"id": alias, "object": "model", "created": int(created.timestamp()),
         "owned_by": "edge-agent"}
        for alias, created in state.registry.model_ids()
    ]
    return web.json_response({"object": "list", "data": data})


class _Usage:
    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0

    def update(self, chunk: Chunk) -> None:
        if chunk.prompt_tokens is not None:
            self.prompt = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.completion = chunk.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = ChatCompletionRequest.model_validate(await read_json(request))
    return await _serve(request, req, req.generation(), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    req = CompletionRequest.model_validate(await read_json(request))
    return await _serve(request, req, req.generation(), chat=False)


async def _serve(
    request: web.Request, req: _CommonRequest, gen: GenerationRequest, *, chat: bool
) -> web.StreamResponse:
    state = request.app[STATE]
    request[MODEL] = gen.model  # for the audit record
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
    parts: list[str] = []
    finish: str | None = None
    chunk: Chunk | None = first
    while chunk is not None:
        usage.update(chunk)
        parts.append(chunk.text)
        finish = chunk.finish_reason or finish
        chunk = await anext(stream, None)
    text = "".join(parts)
    request[USAGE] = usage.as_dict()
    if request.app[STATE].settings.logging.log_content:
        log.info("content: %s completion %r", req.model, text)
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish or "stop",
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish or "stop", "logprobs": None}
        obj = "text_completion"
    return web.json_response(
        {
            "id": rid,
            "object": obj,
            "created": created,
            "model": req.model,
            "choices": [choice],
            "usage": usage.as_dict(),
        }
    )


async def _stream(reply: _Reply) -> web.StreamResponse:
    request, req, stream, first, rid, created, chat = (
        reply.request, reply.req, reply.stream, reply.first, reply.rid, reply.created, reply.chat
    )
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
    )
    await resp.prepare(request)
    usage = _Usage()
    obj = "chat.completion.chunk" if chat else "text_completion"

    async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        payload = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": req.model,
            "choices": choices,
            **(extra or {}),
        }
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    # The per-token event differs only in its text: encode the rest once, since on a
    # 2-core device every microsecond here is taken from the model's threads.
    head = json.dumps({"id": rid, "object": obj, "created": created, "model": req.model})
    key = '"delta": {"content": ' if chat else '"text": '
    tail = "}" if chat else ""
    prefix = f'data: {head[:-1]}, "choices": [{{"index": 0, {key}'.encode()
    suffix = f'{tail}, "finish_reason": null, "logprobs": null}}]}}\n\n'.encode()
    if chat:
        await send([choice(None, None, role=True)])
    chunk: Chunk | None = first
    try:
        while chunk is not None:
            usage.update(chunk)
            if chunk.finish_reason is None:
                if chunk.text:
                    await resp.write(prefix + json.dumps(chunk.text).encode() + suffix)
            else:
                await send([choice(chunk.text, chunk.finish_reason)])
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
    RouteSpec("GET", "/v1/models", list_models, "models:read"),
    RouteSpec(
        "POST", "/v1/chat/completions", chat_completions, "inference:invoke", model_scoped=True
    ),
    RouteSpec("POST", "/v1/completions", completions, "inference:invoke", model_scoped=True),
]
