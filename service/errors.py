"""Errors raised by routes and how they become HTTP responses (here, at the edge, and nowhere else)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from contract.schemas import ErrorOut, ProblemOut

log = logging.getLogger(__name__)

# What a route answers besides its success, for the OpenAPI schema: {status: {"model": ErrorOut, ...}}.
Responses = dict[int | str, dict[str, Any]]


# What every authenticated route can answer: the one error shape (``ErrorOut``) for each 4xx.
AUTHED: Responses = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key (`Authorization: Bearer KEY`)"},
    408: {"model": ErrorOut, "description": "The request body stalled (DHVAE_BODY_TIMEOUT_S)"},
    413: {"model": ErrorOut, "description": "Body past the limit (JSON: DHVAE_MAX_JSON_BYTES)"},
    422: {"model": ErrorOut, "description": "Invalid request: `problems` names each field and why"},
}


# The schema of a binary body (a zip, a PNG), so that client generators make it a file.
BINARY: dict[str, str] = {"type": "string", "format": "binary"}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        problems: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problems = problems or []
        self.headers = headers


def not_found(what: str, obj_id: str) -> ApiError:
    return ApiError(404, f"{what} {obj_id} not found")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of ``app`` serves at ``path``, and OPTIONS."""
    methods = {"OPTIONS"}
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope: dict[str, Any] = {
            "type": "http",
            "path": path,
            "method": method,
            "root_path": "",
            "headers": [],
        }
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            methods.add(method)
    return sorted(methods)


def _location(loc: Any) -> str:
    """``("body", "steps")`` -> ``body.steps``: where in the request the problem is."""
    return ".".join(str(part) for part in loc) or "<request>"


def error_body(detail: str, problems: list[tuple[str, str]] | None = None) -> dict:
    return ErrorOut(
        detail=detail, problems=[ProblemOut(file=f, problem=p) for f, p in problems or []]
    ).model_dump()


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.detail, exc.problems), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own answers (unknown path, wrong method) in the one error shape; a 405 lists every
        method the path has (Starlette names only the first route's), and OPTIONS answers with them."""
        if exc.status_code != 405:
            detail = exc.detail if isinstance(exc.detail, str) else "request refused"
            return JSONResponse(error_body(detail), status_code=exc.status_code, headers=exc.headers)
        allow = ", ".join(allowed_methods(request.app, request.url.path))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        body = error_body(f"{request.method} is not allowed here; allowed: {allow}")
        return JSONResponse(body, status_code=405, headers={"Allow": allow})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 in the service's one error shape, naming each bad field; the input is never echoed
        back (it may be megabytes, or NaN, which JSON cannot carry)."""
        problems = [(_location(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in exc.errors()]
        return JSONResponse(error_body("the request is not valid", problems[:50]), status_code=422)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _store_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        body = error_body("the job store is unavailable (restarting?); retry shortly")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
