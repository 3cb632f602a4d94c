"""`POST /v1/responses`: OpenAI's Responses API (the one the current `openai` client steers
new code to) for chat models — text input or input messages, `instructions`, sampling,
`text.format` (text, JSON object, JSON Schema), streaming as its typed events.

It is served by the same scheduler as chat completions; nothing is stored on the device,
so what needs server-side state (`previous_response_id`, `store: true`, background runs,
conversations) and what is not implemented here (tools, reasoning) is refused with a 400
naming the parameter.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from agent.api.access import END_USER, MODEL, USAGE
from agent.api.errors import APIError
from agent.api.limits import EventStream
from agent.api.openai import (
    ContentPart,
    KeepAlive,
    ModelAlias,
    join_text_parts,
    parse_keep_alive,
    read_json,
    refuse_unimplemented,
)
from agent.api.routes import RouteSpec
from agent.api.tasks import check_route
from agent.runtime.types import ChatMessage, Chunk, GenerationRequest, Sampling
from agent.state import STATE

_REFUSED: dict[str, tuple[str, tuple[object, ...]]] = {
    "previous_response_id": ("stored responses (nothing is stored on the device)", (None,)),
    "conversation": ("stored conversations", (None,)),
    "store": ("storing responses", (None, False)),
    "background": ("background runs", (None, False)),
    "tools": ("tools in the Responses API (use /v1/chat/completions)", (None, ())),
    "tool_choice": ("tools in the Responses API (use /v1/chat/completions)",
                    (None, "none", "auto")),
    "reasoning": ("reasoning (no reasoning models here)", (None,)),
    "include": ("extra output", (None, ())),
    "prompt": ("stored prompt templates", (None,)),
    "max_tool_calls": ("tools in the Responses API", (None,)),
    "top_logprobs": ("log-probabilities in the Responses API", (None, 0)),
}


class InputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelAlias
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    text: TextOptions = Field(default_factory=TextOptions)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    keep_alive: KeepAlive = None

    def generation(self) -> GenerationRequest:
        messages: list[ChatMessage] = []
        if self.instructions:
            messages.append(ChatMessage(role="system", content=self.instructions))
        if isinstance(self.input, str):
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            for i, item in enumerate(self.input):
                content = item.content
                if isinstance(content, list):
                    content = join_text_parts(content, f"input.{i}",
                                              ("input_text", "output_text", "text"))
                messages.append(ChatMessage(role=item.role, content=content))
        fmt = self.text.format
        if fmt.type == "json_schema" and fmt.schema_ is None:
            raise APIError(400, "text.format: json_schema needs a schema",
                           param="text.format.schema", code="invalid_value")
        fields: dict[str, Any] = {"max_tokens": self.max_output_tokens,
                                  "temperature": self.temperature, "top_p": self.top_p}
        sampling = Sampling(**{k: v for k, v in fields.items() if v is not None},
                            json_object=fmt.type == "json_object",
                            json_schema=json.dumps(fmt.schema_) if fmt.schema_ else None,
                            json_schema_strict=bool(fmt.strict))
        return GenerationRequest(model=self.model, messages=messages, sampling=sampling,
                                 keep_alive=parse_keep_alive(self.keep_alive))


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    refuse_unimplemented(body, _REFUSED)
    req = ResponsesRequest.model_validate(body)
    gen = req.generation()
    state = request.app[STATE]
    request[MODEL] = req.model
    await check_route(request, req.model, "responses")
    if (end_user := req.safety_identifier or req.user) is not None:
        request[END_USER] = end_user
    stream = state.scheduler.generate(gen)
    try:
        first = await anext(stream)  # errors (404, 429, 503) get their status
    except StopAsyncIteration:
        first = Chunk(finish_reason="stop")
    except BaseException:
        await stream.aclose()
        raise
    rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    shell = _shell(req, rid, int(time.time()))
    try:
        if not req.stream:
            chunk: Chunk | None = first
            parts, prompt, completion, finish = [], 0, 0, "stop"
            while chunk is not None:
                parts.append(chunk.text)
                prompt = chunk.prompt_tokens or prompt
                completion = chunk.completion_tokens or completion
                finish = chunk.finish_reason or finish
                chunk = await anext(stream, None)
            done = _finished(shell, mid, "".join(parts), prompt, completion, finish)
            request[USAGE] = _usage_for_audit(done)
            return web.json_response(done)
        return await _stream(request, stream, first, shell, mid)
    finally:
        await stream.aclose()


def _shell(req: ResponsesRequest, rid: str, created: int) -> dict[str, Any]:
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress",
            "model": req.model, "output": [], "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "parallel_tool_calls": False, "tool_choice": "none",
            "tools": [], "text": {"format": fmt}, "metadata": req.metadata or {},
            "error": None, "incomplete_details": None, "usage": None, "store": False}


def _message(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _finished(shell: dict[str, Any], mid: str, text: str, prompt: int, completion: int,
              finish: str) -> dict[str, Any]:
    cut = finish == "length"
    return {**shell, "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": [_message(mid, text, "incomplete" if cut else "completed")],
            "usage": {"input_tokens": prompt, "output_tokens": completion,
                      "total_tokens": prompt + completion,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}


def _usage_for_audit(done: dict[str, Any]) -> dict[str, int]:
    u = done["usage"]
    return {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
            "total_tokens": u["total_tokens"]}


async def _stream(request: web.Request, stream: Any, first: Chunk, shell: dict[str, Any],
                  mid: str) -> web.StreamResponse:
    """The typed events, in the order OpenAI sends them."""
    resp = EventStream(request)
    await resp.prepare(request)
    seq = 0

    async def event(kind: str, **fields: Any) -> None:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        await resp.write(f"event: {kind}\ndata: ".encode() + json.dumps(payload).encode()
                         + b"\n\n")

    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    await event("response.created", response=shell)
    await event("response.in_progress", response=shell)
    await event("response.output_item.added", output_index=0,
                item={**_message(mid, "", "in_progress"), "content": []})
    await event("response.content_part.added", **where,
                part={"type": "output_text", "text": "", "annotations": []})
    parts: list[str] = []
    prompt = completion = 0
    finish = "stop"
    chunk: Chunk | None = first
    while chunk is not None:
        if chunk.text:
            parts.append(chunk.text)
            await event("response.output_text.delta", **where, delta=chunk.text)
        prompt = chunk.prompt_tokens or prompt
        completion = chunk.completion_tokens or completion
        finish = chunk.finish_reason or finish
        chunk = await anext(stream, None)
    text = "".join(parts)
    done = _finished(shell, mid, text, prompt, completion, finish)
    request[USAGE] = _usage_for_audit(done)
    await event("response.output_text.done", **where, text=text)
    await event("response.content_part.done", **where,
                part={"type": "output_text", "text": text, "annotations": []})
    await event("response.output_item.done", output_index=0, item=done["output"][0])
    await event("response.incomplete" if done["status"] == "incomplete"
                else "response.completed", response=done)
    await resp.write_eof()
    return resp


ROUTES = [
    RouteSpec("POST", "/v1/responses", create_response, "inference:invoke", model_scoped=True),
    RouteSpec("POST", "/responses", create_response, "inference:invoke", model_scoped=True),
]
