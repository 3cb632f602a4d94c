"""API errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Every failure leaves the server through `error_middleware`, so clients see one shape, and
`to_api_error` is the one place an exception becomes an HTTP status.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from agent.errors import (
    AuditUnavailable,
    ChatNotSupported,
    GenerationFailed,
    InvalidSampling,
    ModelLoadFailed,
    PolicyError,
    PromptTooLong,
    QueueFull,
    Stopping,
    TaskNotSupported,
    TokenAttemptsExceeded,
    TokenError,
)
from registry.errors import ModelInUse, ModelNotFound, RegistryError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI type/code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_response(err: APIError) -> web.Response:
    body = {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }
    return web.json_response(body, status=err.status, headers=err.headers)


def from_validation(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(
        400, f"invalid request: {param}: {first['msg']}", param=param, code="invalid_value"
    )


def to_api_error(exc: BaseException) -> APIError | None:
    """Map a known exception to its API error; None for unexpected ones."""
    match exc:
        case APIError():
            return exc
        case ValidationError():
            return from_validation(exc)
        case json.JSONDecodeError() | UnicodeDecodeError():
            return APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json")
        case ModelNotFound():
            return APIError(404, str(exc), code="model_not_found", param="model")
        case PromptTooLong():
            return APIError(400, str(exc), code="context_length_exceeded", param="messages")
        case ChatNotSupported():
            return APIError(400, str(exc), code="chat_not_supported", param="model")
        case InvalidSampling():
            return APIError(400, str(exc), code="invalid_value", param=exc.param)
        case TaskNotSupported():
            return APIError(400, str(exc), code="unsupported_task", param="model")
        case QueueFull():
            return APIError(
                429,
                str(exc),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(exc.retry_after)},
            )
        case ModelLoadFailed():
            return APIError(503, str(exc), type="server_error", code="model_load_failed")
        case Stopping():
            return APIError(503, str(exc), type="server_error", code="stopping")
        case GenerationFailed():
            return APIError(503, str(exc), type="server_error", code="generation_failed")
        case AuditUnavailable():
            return APIError(503, str(exc), type="server_error", code="audit_unavailable",
                            headers={"Retry-After": str(exc.retry_after)})
        case TokenAttemptsExceeded():
            return APIError(429, str(exc), type="rate_limit_error", code="too_many_attempts",
                            headers={"Retry-After": str(exc.retry_after)})
        case TokenError():
            return APIError(401, str(exc), type="authentication_error", code="invalid_token")
        case PolicyError():
            return APIError(400, str(exc), code="invalid_policy")
        case ModelInUse():
            return APIError(409, str(exc), code="model_in_use")
        case RegistryError():
            return APIError(400, str(exc), code="registry_error")
        case web.HTTPRequestEntityTooLarge():
            return APIError(413, "request body too large", code="body_too_large")
        case web.HTTPException():
            return APIError(exc.status, exc.reason, type=_type_for(exc.status))
    return None


def _type_for(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except Exception as exc:
        err = to_api_error(exc)
        if err is None:
            log.exception("unhandled error on %s %s", request.method, request.path)
            err = APIError(500, "internal error", type="server_error", code="internal_error")
        return error_response(err)
