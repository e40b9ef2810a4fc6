"""Every error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every 4xx and
5xx: ours, FastAPI's and Starlette's (bad JSON, unknown routes, wrong methods) and crashes alike.

Messages shown to clients never hold server paths, file contents or adapter config values: adapter
errors show their `public` reason, crashes a fixed text (the server log has the rest).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from graftlm.engine.adapter_finder import UnknownAdapterError
from graftlm.engine.engine import EngineOverloadedError, TenantBusyError
from graftlm.errors import GraftlmError, PromptTooLongError
from graftlm.lora.config import AdapterError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def not_found(model: str) -> ApiError:
    """The one answer for a model that does not exist and for one the caller may not use."""
    return ApiError(
        404, f"The model {model[:80]!r} does not exist or you do not have access to it.", "model_not_found", "model"
    )


def as_api_error(e: BaseException, model: str = "") -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownAdapterError):
        return not_found(model)
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), "context_length_exceeded", "messages")
    if isinstance(e, TenantBusyError):
        return ApiError(429, str(e), "rate_limit_exceeded")
    if isinstance(e, EngineOverloadedError):
        return ApiError(503, str(e), "overloaded")
    if isinstance(e, AdapterError):
        return ApiError(400, adapter_message(e, model), "adapter_error", "model")
    if isinstance(e, GraftlmError):
        return ApiError(400, str(e))
    log.error("request failed", exc_info=e)
    return ApiError(500, "internal server error (the server log has the details)", "internal_error")


def adapter_message(e: AdapterError, name: str) -> str:
    reason = e.public or "it is not a valid adapter for this server"
    return f"adapter {name[:80]!r} cannot be used: {reason}"


def install(app: FastAPI) -> None:
    """Route every error the app can raise to an OpenAI-shaped JSON response."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(GraftlmError)
    async def _graftlm(_: Request, exc: GraftlmError) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI raises these for a body it cannot decode (invalid UTF-8, JSON nested too deep), Starlette
        # for unknown routes and wrong methods
        message = "the body is not valid UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return ApiError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()


def validation_error(exc: RequestValidationError) -> ApiError:
    """A 400 naming every field pydantic refused."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        elif not where and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the body must be a JSON object")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where[:80]!r}")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
    param = ".".join(str(x) for x in first if x != "body") or None
    return ApiError(400, "; ".join(parts) or "bad request", param=param)
