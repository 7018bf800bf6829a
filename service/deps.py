"""What routes depend on: the authenticated tenant and the app's shared resources.

Auth: ``Authorization: Bearer KEY``. ``DHVAE_API_KEYS="tenant-a:KEY1,tenant-b:KEY2"`` is parsed once;
only the SHA-256 of each key is kept, and a presented key's hash is compared with every stored hash
with ``hmac.compare_digest`` (no early exit, so timing tells nothing about which key nearly matched).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from runtime.celeryconf import celery_config
from runtime.jobs import JobStore
from runtime.storage import LocalStorage, check_tenant
from service.errors import ApiError
from service.idempotency import Idempotency
from service.settings import Settings
from service.uploads import ValidationPool

log = logging.getLogger(__name__)


class KeyRing:
    """Tenants by API key, holding only the keys' SHA-256 digests."""

    def __init__(self, spec: str):
        self._entries: list[tuple[str, bytes]] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep or not key:
                raise ValueError(f"DHVAE_API_KEYS entry {item.split(':')[0]!r}: expected tenant:key")
            check_tenant(tenant)
            if key.startswith("sha256:"):
                digest = bytes.fromhex(key.removeprefix("sha256:"))
                if len(digest) != 32:
                    raise ValueError(
                        f"DHVAE_API_KEYS entry for {tenant!r}: sha256 digest must be 64 hex digits"
                    )
            else:
                digest = hashlib.sha256(key.encode()).digest()
            self._entries.append((tenant, digest))

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for tenant, stored in self._entries:
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found


@dataclass
class Context:
    settings: Settings
    storage: LocalStorage
    redis: redis.Redis
    aredis: AsyncRedis
    jobs: JobStore
    celery: Celery
    keys: KeyRing
    idempotency: Idempotency
    validation: ValidationPool

    @classmethod
    def build(cls, settings: Settings) -> Context:
        url = settings.require_redis_url()
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
        client = redis.Redis.from_url(url, retry=retry, socket_timeout=10, health_check_interval=30)
        aretry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
        aclient = AsyncRedis.from_url(url, retry=aretry, health_check_interval=30)
        celery = Celery("dhvae-api", set_as_current=False)
        celery.conf.update(celery_config(settings))
        keys = KeyRing(settings.api_keys)
        if not len(keys):
            log.warning("DHVAE_API_KEYS is empty: every request will be refused with 401")
        return cls(
            settings=settings,
            storage=LocalStorage(settings.data_dir),
            redis=client,
            aredis=aclient,
            jobs=JobStore(client, ttl_s=settings.job_ttl_s),
            celery=celery,
            keys=keys,
            idempotency=Idempotency(client, settings.idempotency_ttl_s),
            validation=ValidationPool(settings.validation_slots, settings.validation_deadline_s),
        )


async def get_ctx(request: Request) -> Context:
    return request.app.state.ctx


# Declares the bearer scheme in the OpenAPI schema (``securitySchemes``); the check is ours.
BEARER = HTTPBearer(
    auto_error=False, description="An API key of DHVAE_API_KEYS: `Authorization: Bearer KEY`."
)


async def require_tenant(
    ctx: Annotated[Context, Depends(get_ctx)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> str:
    key = credentials.credentials.strip() if credentials else ""
    tenant = ctx.keys.tenant_for(key) if key else None
    if tenant is None:
        raise ApiError(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


Ctx = Annotated[Context, Depends(get_ctx)]
Tenant = Annotated[str, Depends(require_tenant)]
