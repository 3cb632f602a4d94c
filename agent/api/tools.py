"""Tool calling for every model, the way llama.cpp's server does it for chat templates
without native tool support (its "generic" format): the tools are described in a system
message, and the reply is constrained by a grammar built from a JSON Schema that admits a
call of one of the offered tools (its arguments checked against the function's own
parameter schema) or, under `tool_choice: "auto"`, a plain answer. The JSON the model
writes is turned back into OpenAI's `tool_calls`. So even a 135M-parameter model returns
a well-formed call with valid arguments when one is required.

The history goes back the same way: an assistant turn with `tool_calls` is shown to the
model as the JSON it wrote, a `tool` message as a `tool_response` object in a user turn
(roles every template knows).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.api.errors import APIError
from agent.runtime.types import ChatMessage


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: _Named


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


class CallIn(BaseModel):
    """An assistant turn's tool call, as the app sends the history back."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(default="", max_length=128)
    type: Literal["function"] = "function"
    function: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request with tools asks of the model: the schema its reply must match and
    the system text that tells it so."""

    schema: dict[str, Any]
    system: str
    parallel: bool
    required: bool


def plan(tools: list[ToolDef] | None, choice: ToolChoice | None,
         parallel: bool | None) -> ToolPlan | None:
    """None when no tool may be called (no tools, or `tool_choice: "none"`)."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice",
                           code="invalid_value")
        return None
    choice = choice or "auto"
    if choice == "none":
        return None
    offered = tools
    if isinstance(choice, NamedChoice):
        offered = [t for t in tools if t.function.name == choice.function.name]
        if not offered:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not "
                           "among the tools", param="tool_choice", code="invalid_value")
    calls = [_call_schema(t.function) for t in offered]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    many = bool(parallel)
    body = ({"type": "object", "properties": {"tool_calls": {
                "type": "array", "items": one, "minItems": 1}},
             "required": ["tool_calls"], "additionalProperties": False}
            if many else
            {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"],
             "additionalProperties": False})
    required = choice != "auto"
    schema = body if required else {"anyOf": [body, {
        "type": "object", "properties": {"response": {"type": "string"}},
        "required": ["response"], "additionalProperties": False}]}
    listing = json.dumps([{"name": t.function.name, "description": t.function.description,
                           "parameters": t.function.parameters or {"type": "object"}}
                          for t in offered], indent=1)
    key = "tool_calls" if many else "tool_call"
    shape = ('[{"name": ..., "arguments": {...}}, ...]' if many
             else '{"name": ..., "arguments": {...}}')
    system = (f"You can call the following tools:\n{listing}\n\nRespond in JSON: "
              f'{{"{key}": {shape}}} to call ' + ("them" if many else "a tool")
              + ("" if required else ', or {"response": "..."} to answer the user directly')
              + ".")
    return ToolPlan(schema, system, many, required)


def _call_schema(f: FunctionDef) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": f.name},
                           "arguments": f.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def with_tools(messages: list[ChatMessage], p: ToolPlan) -> list[ChatMessage]:
    """The tools' system text first (joined to the app's own system message, if any)."""
    if messages and messages[0].role == "system":
        first = ChatMessage(role="system", content=f"{messages[0].content}\n\n{p.system}")
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=p.system), *messages]


def assistant_calls(calls: list[CallIn], index: int) -> str:
    """An assistant turn's calls as the JSON the model writes."""
    out = []
    for j, c in enumerate(calls):
        name = c.function.get("name")
        raw = c.function.get("arguments", "{}")
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise APIError(400, f"messages[{index}].tool_calls[{j}].function.arguments is "
                           f"not JSON: {exc}",
                           param=f"messages.{index}.tool_calls.{j}.function.arguments",
                           code="invalid_value") from exc
        out.append({"name": name, "arguments": args})
    return json.dumps({"tool_call": out[0]} if len(out) == 1 else {"tool_calls": out})


def tool_result(content: str, tool_call_id: str | None) -> ChatMessage:
    body: dict[str, Any] = {"content": content}
    if tool_call_id:
        body["tool_call_id"] = tool_call_id
    return ChatMessage(role="user", content=json.dumps({"tool_response": body}))


def parse(text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) from the model's JSON; the text as content if it is not the
    JSON the grammar asked for (cut by max_tokens)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a model that nested 1,000 deep
        return text, None
    if not isinstance(data, dict):
        return text, None
    if isinstance(data.get("response"), str):
        return data["response"], None
    calls = data.get("tool_calls")
    if calls is None and isinstance(data.get("tool_call"), dict):
        calls = [data["tool_call"]]
    if not isinstance(calls, list):
        return text, None
    return None, [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                   "function": {"name": c.get("name"),
                                "arguments": json.dumps(c.get("arguments", {}))}}
                  for c in calls if isinstance(c, dict)]
