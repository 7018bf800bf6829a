"""What every request meets before a route: the body limits, and answers that reach real clients.

Pure ASGI middleware (no Starlette ``BaseHTTPMiddleware``: it would buffer streamed uploads):

- **JSON bodies are capped** (``DHVAE_MAX_JSON_BYTES``, 1 MiB): a larger declared ``Content-Length`` is
  413 before a byte is read, and a chunked body is cut off with a 413 the moment it passes the cap.
  Uploads (``application/zip``, ``application/octet-stream``) have their own, larger limit, checked
  while they are streamed to disk (``service/uploads.py``).
- **Every body read has a deadline** (``DHVAE_BODY_TIMEOUT_S``): a client that stops sending mid-body
  gets a 408 instead of holding a connection and a thread for ever.
- **Early answers are drained.** A 401 (bad key) or 413 sent before the body was read would otherwise
  be followed by the server closing a connection the client is still writing to; Python's ``requests``
  and ``urllib`` then report "Connection reset by peer" instead of the status. Up to
  ``DHVAE_DRAIN_BYTES`` of the unread body are read and discarded first, so the client sees the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from starlette.requests import ClientDisconnect

from service.uploads import ZIP_TYPES

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_TYPES = ZIP_TYPES  # bodies streamed to disk under their own limit (zip cohorts, checkpoints)


class BodyTimeout(Exception):
    """The client sent nothing for ``body_timeout_s`` in the middle of its body."""


class BodyTooLarge(Exception):
    """A JSON body passed the cap while it was being read."""


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail, "problems": []}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, max_json_bytes: int, body_timeout_s: float, drain_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.body_timeout_s = body_timeout_s
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctype = _header(scope, b"content-type").split(";")[0].strip().lower()
        limit = None if ctype in UPLOAD_TYPES else self.max_json_bytes
        declared = _header(scope, b"content-length")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            await self._drain(receive, min(int(declared), self.drain_bytes))
            await _answer(send, 413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return

        state: dict[str, Any] = {"read": 0, "done": False, "started": False, "override": None}

        async def guarded_receive() -> Message:
            with anyio.move_on_after(self.body_timeout_s) as timer:
                message = await receive()
            if timer.cancelled_caught:
                log.info(
                    "%s %s: body stalled for %g s: 408", scope["method"], scope["path"], self.body_timeout_s
                )
                detail = f"the request body stalled for {self.body_timeout_s:g} s"
                state["override"] = (408, detail, {"Connection": "close"})
                raise BodyTimeout
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state["done"] = True
                if limit is not None and state["read"] > limit:
                    state["override"] = (413, f"request body exceeds the limit of {limit} bytes", {})
                    raise BodyTooLarge
            elif message["type"] == "http.disconnect":
                state["done"] = True
            return message

        async def quiet_receive() -> Message:
            try:
                return await guarded_receive()
            except (BodyTimeout, BodyTooLarge):
                return {"type": "http.disconnect"}

        async def answer_override() -> None:
            status, detail, headers = state["override"]
            if status == 413:
                await self._drain(quiet_receive, self.drain_bytes)
            state["started"] = True
            await _answer(send, status, detail, headers)

        async def guarded_send(message: Message) -> None:
            # FastAPI turns an error while it reads a JSON body into its own 400: answer ours instead
            if state["override"] is not None:
                if message["type"] == "http.response.start" and not state["started"]:
                    await answer_override()
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                if message["status"] >= 400 and not state["done"]:
                    await self._drain(quiet_receive, self.drain_bytes)
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except (BodyTimeout, BodyTooLarge):
            if not state["started"]:
                await answer_override()
        except ClientDisconnect:
            log.info("%s %s: the client went away during its request", scope["method"], scope["path"])

    async def _drain(self, receive: Receive, bound: int) -> None:
        """Read and discard up to ``bound`` more body bytes (bounded in time as well)."""
        seen = 0
        with anyio.move_on_after(self.body_timeout_s):
            while seen <= bound:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
