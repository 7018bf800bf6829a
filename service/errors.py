"""Errors raised by routes and how they become HTTP responses (here, at the edge, and nowhere else)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from contract.schemas import ErrorOut, ProblemOut

log = logging.getLogger(__name__)

# What a route answers besides its success, for the OpenAPI schema: {status: {"model": ErrorOut, ...}}.
Responses = dict[int | str, dict[str, Any]]


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


def error_body(detail: str, problems: list[tuple[str, str]] | None = None) -> dict:
    return ErrorOut(
        detail=detail, problems=[ProblemOut(file=f, problem=p) for f, p in problems or []]
    ).model_dump()


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.detail, exc.problems), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _store_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        body = error_body("the job store is unavailable (restarting?); retry shortly")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
