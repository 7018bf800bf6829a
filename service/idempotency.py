"""``Idempotency-Key``: a POST repeated by the same tenant with the same key returns the first response.

The first request claims the key (``SET NX``, marked pending), runs, and stores its response; a
repeat gets that stored response (with ``Idempotent-Replayed: true``) and starts nothing. A repeat
while the first is still running gets 409; a repeat with a different JSON body gets 422. Only
successful responses are stored: after an error the key is released so the client can retry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable

import redis
from fastapi import Response
from fastapi.responses import JSONResponse

from service.errors import ApiError

KEEP_HEADERS = ("location",)


class Idempotency:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.r = client
        self.ttl_s = ttl_s

    @staticmethod
    def _key(tenant: str, key: str) -> str:
        return f"dhvae:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    def begin(self, tenant: str, key: str, fingerprint: str | None) -> JSONResponse | None:
        """None: the caller runs the request. Otherwise the first request's stored response."""
        if len(key) > 255:
            raise ApiError(422, "Idempotency-Key is longer than 255 characters")
        rkey = self._key(tenant, key)
        for _ in range(3):
            if self.r.set(rkey, json.dumps({"state": "pending", "fp": fingerprint}), nx=True, ex=self.ttl_s):
                return None
            raw = self.r.get(rkey)
            if raw is None:  # expired or released between the two calls
                continue
            saved = json.loads(raw)
            if saved["state"] == "pending":
                raise ApiError(409, "a request with this Idempotency-Key is still being processed")
            if fingerprint and saved.get("fp") and saved["fp"] != fingerprint:
                raise ApiError(422, "this Idempotency-Key was used with a different request body")
            headers = {**saved["headers"], "Idempotent-Replayed": "true"}
            return JSONResponse(saved["body"], status_code=saved["status"], headers=headers)
        raise ApiError(409, "Idempotency-Key is contended; retry")

    def finish(self, tenant: str, key: str, fingerprint: str | None, response: Response) -> None:
        saved = {
            "state": "done",
            "fp": fingerprint,
            "status": response.status_code,
            "body": json.loads(bytes(response.body)),
            "headers": {k: v for k, v in response.headers.items() if k.lower() in KEEP_HEADERS},
        }
        self.r.set(self._key(tenant, key), json.dumps(saved), ex=self.ttl_s)

    def release(self, tenant: str, key: str) -> None:
        self.r.delete(self._key(tenant, key))

    def run(
        self, tenant: str, key: str | None, fingerprint: str | None, handler: Callable[[], Response]
    ) -> Response:
        """Run ``handler`` once per (tenant, key); without a key, just run it."""
        if not key:
            return handler()
        replay = self.begin(tenant, key, fingerprint)
        if replay is not None:
            return replay
        try:
            response = handler()
        except BaseException:
            self.release(tenant, key)
            raise
        return self._settle(tenant, key, fingerprint, response)

    async def arun(
        self,
        tenant: str,
        key: str | None,
        fingerprint: str | None,
        handler: Callable[[], Awaitable[Response]],
    ) -> Response:
        """``run`` for an async handler (the streamed uploads)."""
        if not key:
            return await handler()
        replay = self.begin(tenant, key, fingerprint)
        if replay is not None:
            return replay
        try:
            response = await handler()
        except BaseException:
            self.release(tenant, key)
            raise
        return self._settle(tenant, key, fingerprint, response)

    def _settle(self, tenant: str, key: str, fingerprint: str | None, response: Response) -> Response:
        if 200 <= response.status_code < 300:
            self.finish(tenant, key, fingerprint, response)
        else:
            self.release(tenant, key)
        return response


def fingerprint(body: bytes | str) -> str:
    data = body.encode() if isinstance(body, str) else body
    return hashlib.sha256(data).hexdigest()
