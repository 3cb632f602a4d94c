"""OpenAI-compatible /v1/embeddings: a string or a list of strings in, one unit vector each
out (float or base64 float32), run in batches on the model's own thread through the
scheduler's queue, audited with the model and its token usage like chat."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.api.access import MODEL, USAGE
from agent.api.errors import APIError
from agent.api.openai import KeepAlive, ModelAlias, parse_keep_alive, read_json
from agent.api.routes import RouteSpec
from agent.api.tasks import check_route
from agent.runtime.backend import Backend
from agent.runtime.types import Embeddings
from agent.state import STATE


class EmbeddingRequest(BaseModel):
    # Unknown OpenAI fields (user, ...) are accepted and ignored, as in the chat routes.
    model_config = ConfigDict(extra="ignore")

    model: ModelAlias
    input: str | list[str] = Field(description="Text, or texts, to embed.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None

    @field_validator("input")
    @classmethod
    def _texts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v


    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _embed(backend: Backend, texts: Sequence[str]) -> Embeddings:
    return backend.embed(texts)


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = EmbeddingRequest.model_validate(await read_json(request))
    texts = req.texts()
    limit = state.settings.runtime.onnx.max_embedding_inputs
    if len(texts) > limit:
        raise APIError(400, f"input has {len(texts)} texts; at most {limit} per request",
                       code="too_many_inputs", param="input")
    request[MODEL] = req.model  # for the audit record
    await check_route(request, req.model, "embeddings")
    out = await state.scheduler.run(req.model, _embed, texts,
                                    keep_alive=parse_keep_alive(req.keep_alive))
    vectors = out.vectors
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise APIError(400, f"model {req.model} makes {vectors.shape[1]}-dimension vectors; "
                       f"it cannot give {req.dimensions}", code="invalid_value",
                       param="dimensions")
    usage = {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}
    request[USAGE] = usage
    data: list[dict[str, Any]] = []
    if req.encoding_format == "base64":
        rows = vectors.astype("<f4", copy=False)
        for i in range(len(texts)):
            data.append({"object": "embedding", "index": i,
                         "embedding": base64.b64encode(rows[i].tobytes()).decode("ascii")})
    else:
        for i, row in enumerate(vectors.tolist()):
            data.append({"object": "embedding", "index": i, "embedding": row})
    body = {"object": "list", "data": data, "model": req.model, "usage": usage}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


ROUTES = [
    RouteSpec("POST", "/v1/embeddings", embeddings, "inference:invoke", model_scoped=True),
    RouteSpec("POST", "/embeddings", embeddings, "inference:invoke", model_scoped=True),
]
