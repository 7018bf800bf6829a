"""The service's answers as exceptions: one class per status a caller handles differently.

Every error the service sends is ``{"detail": str, "problems": [{"file", "problem"}]}`` (its
``ErrorOut``); :func:`error_for` turns a response into the matching :class:`ServiceError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an upload or a request: the file (or field) and what is wrong with it."""

    file: str
    problem: str


class ServiceError(Exception):
    """An error answer of the service. ``status`` is the HTTP status, ``detail`` the service's words."""

    def __init__(self, status: int, detail: str, problems: list[Problem] | None = None) -> None:
        self.status, self.detail, self.problems = status, detail, problems or []
        lines = [f"HTTP {status}: {detail}"] + [f"  {p.file}: {p.problem}" for p in self.problems]
        super().__init__("\n".join(lines))


class BadRequest(ServiceError):
    """400, or a 422 for a request body the service refused (the fields are in ``problems``)."""


class AuthError(ServiceError):
    """401: no API key, or a wrong one."""


class NotFound(ServiceError):
    """404: no such cohort, job or model for this key."""


class Conflict(ServiceError):
    """409: the resource is not in a state for this (e.g. downloading a failed job)."""


class TooLarge(ServiceError):
    """413: a body or an archive past the service's limits (``GET /openapi.json`` lists them)."""


class UnsupportedMedia(ServiceError):
    """415: the wrong Content-Type."""


class CohortInvalid(ServiceError):
    """422 on an upload: the archive or the cohort in it is unusable; ``problems`` says where and why."""


class TooManyJobs(ServiceError):
    """429: this key has as many active jobs as it may; wait for one to finish."""


class QuotaExceeded(ServiceError):
    """507: this key's storage quota is used up; delete a cohort or a job's output."""


class Unavailable(ServiceError):
    """503: the service cannot reach Redis or any worker (the client retried before raising this)."""


class JobFailed(Exception):
    """A job the client waited for ended ``failed`` or ``cancelled``; ``job`` is its last state."""

    def __init__(self, job: Any) -> None:
        self.job = job
        err = (job.data.get("error") or {}) if hasattr(job, "data") else {}
        why = f": {err.get('type')}: {err.get('message')}" if err else ""
        super().__init__(f"job {job.id} {job.state}{why}")


class IntegrityError(Exception):
    """A downloaded file does not match the sha256 or size that manifest.json gives for it."""


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest,
    401: AuthError,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: UnsupportedMedia,
    422: BadRequest,
    429: TooManyJobs,
    503: Unavailable,
    507: QuotaExceeded,
}


def error_for(status: int, body: Any, *, upload: bool = False) -> ServiceError:
    """The exception of an error answer (``body`` its parsed JSON, or text when it was not JSON)."""
    if isinstance(body, dict):
        detail = str(body.get("detail", body))
        problems = [
            Problem(str(p.get("file", "")), str(p.get("problem", "")))
            for p in body.get("problems", []) or []
            if isinstance(p, dict)
        ]
    else:
        detail, problems = str(body or "").strip() or f"HTTP {status}", []
    cls = CohortInvalid if upload and status == 422 else _BY_STATUS.get(status, ServiceError)
    return cls(status, detail, problems)
