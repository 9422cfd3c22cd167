"""JSON errors with a stable ``code``: what clients branch on, and what the OpenAPI declares.

Every error body is ``{"code": "...", "message": "..."}``. ``code`` is part of the API and
never changes meaning; ``message`` is for people and may be reworded.

A database outage is answered on every route with **503** ``database_unavailable`` and a
``Retry-After`` header (see :mod:`privsep.server.db.outage`); the request had no effect, and
the same request may be sent again after that many seconds.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from privsep.server.db.outage import RETRY_AFTER_S, unavailable


class ErrorBody(BaseModel):
    """The body of every error response."""

    model_config = ConfigDict(extra="forbid")
    code: str
    message: str


class ApiError(Exception):
    """Raise from a route to answer ``status`` with a stable ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message)


def forbidden(message: str, code: str = "forbidden") -> ApiError:
    return ApiError(403, code, message)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, code, message)


def conflict(message: str, code: str = "conflict") -> ApiError:
    return ApiError(409, code, message)


# Declared on every route (FastAPI ``responses=``), so the OpenAPI document lists them all.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Malformed request"),
        (401, "Missing, invalid or expired token"),
        (403, "The token's subject may not do this"),
        (404, "No such resource"),
        (409, "The resource is in a state that does not allow this"),
        (413, "Request body too large"),
        (422, "Request body does not match the schema"),
        (503, "The database is unavailable; send the request again after Retry-After seconds"),
    )
}

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid_request",
}

UNAVAILABLE_CODE = "database_unavailable"
UNAVAILABLE_MESSAGE = "the server's database is unavailable; try again later"
UNAVAILABLE_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}

# Whatever a database error may arrive as, wrapped by SQLAlchemy or straight from a driver.
_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.DBAPIError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    sqlite3.Error,
)
try:
    import psycopg

    _DATABASE_ERRORS += (psycopg.Error,)
except ImportError:  # a SQLite-only installation
    pass


def _body(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"code": code, "message": message})


def install_error_handlers(app: FastAPI) -> None:
    """Map every error a client can cause to ``{"code", "message"}`` JSON."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)  # noqa: S101 - registered for ApiError only
        return _body(exc.status, exc.code, exc.message)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        code = _STATUS_CODES.get(exc.status_code, "error")
        return _body(exc.status_code, code, str(exc.detail))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()[:5]
        )
        return _body(422, "invalid_request", problems or "request does not match the schema")

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        """An outage is a 503 and counts in the incident; any other database error is a bug,
        raised again to keep its 500 and its traceback."""
        if not unavailable(exc):
            raise exc
        request.app.state.privsep.db.incidents.failed(exc, f"{request.method} {request.url.path}")
        return JSONResponse(
            status_code=503,
            content={"code": UNAVAILABLE_CODE, "message": UNAVAILABLE_MESSAGE},
            headers=UNAVAILABLE_HEADERS,
        )

    for error in _DATABASE_ERRORS:
        app.add_exception_handler(error, on_database_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
