"""The socket API as an OpenAPI 3.1 document, built from the route table and the models.

Request bodies are the handlers' own pydantic models; responses are the models below,
which describe what the handlers write (the fuzz test, tests/test_fuzz_api.py, holds the
daemon to them). Every route of the table needs an entry in `OPERATIONS`: `document()`
refuses a table with a route it cannot describe, so a new route cannot go undocumented.
docs/gen_openapi.py writes docs/openapi.json from `create_app()`'s table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from agent.api.embeddings import EmbeddingRequest
from agent.api.openai import ChatCompletionRequest, CompletionRequest, KeepAlive
from agent.api.responses import ResponsesRequest
from agent.api.routes import PUBLIC, RouteSpec
from agent.runtime.types import LoadedModel
from fleet.auditchain import Record
from registry.profile import HardwareProfile
from registry.selection_index import Selection
from registry.service import ModelInfo

__all__ = ["OPERATIONS", "Operation", "document"]

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"


# --- the error envelope (agent.api.errors) ---------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error, OpenAI's shape."""

    error: ErrorDetail


# --- health and the agent's own API -----------------------------------------------------

class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "starting", "stopping", "not_ready"]
    reason: str | None = None


class HeldBinding(BaseModel):
    binding: str = Field(description="The binding: uid:0, group:NAME, token:NAME, ….")
    role: str
    models: list[str] | None = Field(description="Its model scope; null: every model.")


class WhoAmI(BaseModel):
    """The identity the policy uses for this caller (a token replaces the uid)."""

    transport: Literal["unix", "tcp"]
    authentication: Literal["peer_credentials", "token", "none"] = Field(
        description="How the subject was established: the socket's kernel credentials, "
                    "an API token, or nothing (TCP without a token).")
    subject: str | None = Field(default=None,
                                description="What bindings match: uid:N(user) or token:NAME.")
    roles: list[str] = Field(description="The roles the policy grants this subject.")
    bindings: list[HeldBinding] = Field(description="The bindings that grant them, in order.")
    token: str | None = Field(default=None, description="The token's name (token callers).")
    token_role: str | None = Field(default=None,
                                   description="The role the token was created with.")
    groups: list[str] | None = Field(default=None,
                                     description="The uid's groups (uid callers only).")
    pid: int | None = Field(default=None, description="The peer's pid (Unix socket).")
    uid: int | None = Field(default=None, description="The peer's uid (Unix socket); with a "
                            "token it is audited but not what the policy matches.")
    gid: int | None = Field(default=None, description="The peer's gid (Unix socket).")


class ModelList(BaseModel):
    models: list[ModelInfo]


class SelectionError(BaseModel):
    error: str


class ModelDetail(ModelInfo):
    selection: Selection | SelectionError


class LoadRequest(BaseModel):
    """The optional body of a load: how long the model stays loaded."""

    model_config = ConfigDict(extra="ignore")
    keep_alive: KeepAlive = None


class Unloaded(BaseModel):
    model: str
    unloaded: bool


class LoadedList(BaseModel):
    models: list[LoadedModel]


AuditEntry = Record
"""One audit record as the API returns it: the chain's own record type (fleet.auditchain)."""


class AuditTail(BaseModel):
    records: list[AuditEntry]


class SyncStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: str
    reason: str | None
    since: float | None
    broker: str | None
    boot: str
    enrollment: dict[str, Any]
    backlog: dict[str, Any]
    dropped: dict[str, Any]
    alarms: list[Any] | dict[str, Any]
    quarantined: int | dict[str, Any] | list[Any]
    attempts: int
    next_retry_at: float | None


class Job(BaseModel):
    id: str
    name: str
    every_seconds: float
    runs: int
    failures: int
    last_run: float | None
    last_duration_s: float | None
    last_error: str | None
    running: bool
    next_run: float | None


class JobList(BaseModel):
    jobs: list[Job]


class PolicyReloaded(BaseModel):
    reloaded: Literal[True]
    message: str
    sha256: str


# --- the OpenAI-compatible API ----------------------------------------------------------

class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    service_tier: Literal["default"] | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    service_tier: Literal["default"] | None = None
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 float32 (little-endian).")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputMessage]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tool_choice: str
    tools: list[Any]
    text: dict[str, Any]
    metadata: dict[str, str]
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    usage: ResponseUsage | None
    store: bool


# --- the operations ---------------------------------------------------------------------

Body = type[BaseModel] | Literal["text"]


@dataclass(frozen=True, slots=True)
class Operation:
    """What the document says of one route beyond its spec."""

    summary: str
    response: Body
    request: type[BaseModel] | None = None
    body_required: bool = True
    stream: bool = False  # 200 may be an event stream (the request's `stream: true`)
    errors: tuple[int, ...] = ()  # statuses besides those the spec implies
    params: tuple[dict[str, Any], ...] = ()


_V1: dict[str, Operation] = {
    "GET /models": Operation("List the installed models.", OpenAIModelList),
    "GET /models/{model}": Operation("One installed model.", ModelObject, errors=(404,)),
    "POST /chat/completions": Operation("Chat completion.", ChatCompletion,
                                        ChatCompletionRequest, stream=True),
    "POST /completions": Operation("Text completion.", Completion, CompletionRequest,
                                   stream=True),
    "POST /responses": Operation("OpenAI Responses API (nothing is stored).", ResponseObject,
                                 ResponsesRequest, stream=True),
    "POST /embeddings": Operation("Embeddings.", EmbeddingList, EmbeddingRequest),
}

OPERATIONS: dict[str, Operation] = {
    "GET /healthz": Operation("Alive: the event loop answers.", Health),
    "GET /readyz": Operation("Ready to take work.", Readiness, errors=(503,)),
    "GET /metrics": Operation("Prometheus metrics.", "text"),
    "GET /agent/v1/whoami": Operation(
        "Who the policy sees: subject, roles, how authenticated (a token sent is verified).",
        WhoAmI, errors=(401, 429, 503)),
    "GET /agent/v1/device": Operation("This device's hardware profile.", HardwareProfile),
    "GET /agent/v1/models": Operation("Installed models and their variants.", ModelList),
    "GET /agent/v1/models/{alias}": Operation("One model, with its selection here.",
                                              ModelDetail),
    "POST /agent/v1/models/{alias}/load": Operation(
        "Load a model (or keep it loaded longer).", LoadedModel, LoadRequest,
        body_required=False),
    "POST /agent/v1/models/{alias}/unload": Operation("Unload a model.", Unloaded),
    "GET /agent/v1/loaded": Operation("The loaded models.", LoadedList),
    "GET /agent/v1/audit": Operation(
        "The newest audit records.", AuditTail, errors=(400,),
        params=({"name": "n", "in": "query", "required": False,
                 "description": "How many records (1 to 1000).",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                            "default": 50}},)),
    "GET /agent/v1/sync": Operation("The fleet link's state.", SyncStatus),
    "GET /agent/v1/jobs": Operation("The scheduled jobs.", JobList),
    "POST /agent/v1/policy/reload": Operation("Re-read the RBAC policy file.", PolicyReloaded,
                                              errors=(400,)),
    **{f"{k.split()[0]} /v1{k.split()[1]}": v for k, v in _V1.items()},
    **_V1,  # the same routes without /v1, for clients whose base URL lacks it
}

# One server-sent event as a client parses it; `data` is a JSON chunk or "[DONE]".
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                   "id": {"type": "string"}, "retry": {"type": "integer"}},
    "required": ["data"],
}

_REASONS = {
    400: "Invalid request.", 401: "Bad or missing token.", 403: "Not permitted.",
    404: "No such model.", 409: "Conflict.", 413: "Body too large.",
    429: "Too many requests (queue full, too many per client, token guessing).",
    503: "Not available now (stopping, model load failed, audit log refusing).",
}


def _statuses(spec: RouteSpec, op: Operation) -> list[int]:
    """The error statuses a route can answer with, from its spec and its operation."""
    out = set(op.errors)
    if spec.permission != PUBLIC:
        out |= {401, 403, 429, 503}
    if spec.method == "POST":
        out |= {400, 413}
    if spec.model_scoped:
        out |= {400, 404}
    if spec.permission == "inference:invoke" or spec.path.endswith("/load"):
        out |= {503}
    return sorted(out)


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in names]


def _ref(model: type[BaseModel], mode: JsonSchemaMode,
         names: Mapping[tuple[Any, JsonSchemaMode], Any]) -> dict[str, Any]:
    return dict(names[(model, mode)])


def document(routes: Mapping[str, RouteSpec], version: str) -> dict[str, Any]:
    """The OpenAPI document for `routes` (keyed "METHOD path", as `ROUTE_TABLE`)."""
    missing = sorted(set(routes) - OPERATIONS.keys())
    if missing:
        raise ValueError(f"routes without an OpenAPI entry in agent.api.schema: {missing}")
    used = {k: OPERATIONS[k] for k in routes}
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = {(ErrorEnvelope, "serialization")}
    for op in used.values():
        if op.request is not None:
            wanted.add((op.request, "validation"))
        if not isinstance(op.response, str):
            wanted.add((op.response, "serialization"))
    ordered = sorted(wanted, key=lambda m: (m[0].__name__, m[1]))
    names, defs = models_json_schema(ordered, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for key in sorted(routes):
        spec, op = routes[key], used[key]
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, op, names)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "edge-agent socket API",
            "version": version,
            "description": (
                "Served on the agent's Unix socket. The caller is the connection's "
                "kernel-verified uid (SO_PEERCRED) unless it sends an API token; each "
                "non-public route needs the permission named in `x-permission` "
                "(docs/security.md). Generated by docs/gen_openapi.py: do not edit."
            ),
        },
        "servers": [{"url": "http://edge-agent", "description": "the Unix socket"}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(defs.get("$defs", {}).items())),
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "An API token (ea_…)."}},
        },
    }


def _operation(spec: RouteSpec, op: Operation,
               names: Mapping[tuple[Any, JsonSchemaMode], Any]) -> dict[str, Any]:
    if isinstance(op.response, str):
        ok: dict[str, Any] = {"text/plain": {"schema": {"type": "string"}}}
    else:
        ok = {"application/json": {"schema": _ref(op.response, "serialization", names)}}
    if op.stream:
        ok["text/event-stream"] = {"schema": SSE_EVENT}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    error = {"application/json": {"schema": _ref(ErrorEnvelope, "serialization", names)}}
    for status in _statuses(spec, op):
        if status == 503 and op.response is Readiness:
            responses["503"] = {"description": "Not ready.", "content": {
                "application/json": {"schema": _ref(Readiness, "serialization", names)}}}
            continue
        responses[str(status)] = {"description": _REASONS[status], "content": error}
    out: dict[str, Any] = {
        "operationId": _operation_id(spec),
        "summary": op.summary,
        "x-permission": spec.permission,
        "x-model-scoped": spec.model_scoped,
        "responses": responses,
    }
    params = _path_params(spec.path) + list(op.params)
    if params:
        out["parameters"] = params
    if op.request is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {
                "schema": _ref(op.request, "validation", names)}},
        }
    if spec.permission != PUBLIC:
        out["security"] = [{}, {"token": []}]
    return out


def _operation_id(spec: RouteSpec) -> str:
    words = [w.strip("{}") for w in spec.path.strip("/").replace(".", "_").split("/")]
    return "_".join([spec.method.lower(), *words]).replace("-", "_")
