"""Job records in Redis: our own hashes, not Celery's result backend.

Celery's ``PENDING`` also means "never heard of it", and its results vanish with the backend's TTL;
the API needs a record per job that exists from the moment it answers 202, survives a Redis restart
(AOF) and carries the tenant, the progress and the cancel flag. Keys::

    dhvae:job:<id>            hash: id tenant kind state progress error created_at started_at
                              finished_at cohort_id model_id request cancel attempts worker
    dhvae:job:<id>:events     stream: one entry per change (the hash's fields after the change)
    dhvae:job:<id>:lease      the worker running it right now (token, expires unless renewed)
    dhvae:tenant:<t>:jobs     sorted set of the tenant's job ids by creation time
    dhvae:jobs:active         set of job ids not yet in a terminal state

Every change is one Lua script: it checks the current state, updates the hash and appends the event
in one step, so a cancel and a worker's "succeeded" cannot interleave and the event stream never
disagrees with the record.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio

from contract.records import JobRecord
from contract.schemas import TERMINAL_STATES, JobError, JobKind, JobProgress, JobState

PREFIX = "dhvae"
EVENTS_MAXLEN = 2000

_UPDATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if ARGV[1] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do if s == state then ok = true end end
  if not ok then return 0 end
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local snap = redis.call('HGETALL', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2], unpack(snap))
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:lease"


def tenant_jobs_key(tenant: str) -> str:
    return f"{PREFIX}:tenant:{tenant}:jobs"


ACTIVE_KEY = f"{PREFIX}:jobs:active"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else v


def decode(fields: Mapping[bytes | str, bytes | str] | Iterable) -> dict[str, str]:
    """A Redis hash (or a stream entry's flat field list) as a ``str -> str`` dict."""
    if isinstance(fields, Mapping):
        return {_s(k): _s(v) for k, v in fields.items()}
    items = list(fields)
    return {_s(items[i]): _s(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _visible(fields: dict[str, str], tenant: str | None) -> JobRecord | None:
    if not fields or (tenant is not None and fields.get("tenant") != tenant):
        return None
    return JobRecord.from_hash(fields)


async def aget(client: redis.asyncio.Redis, job_id: str, tenant: str | None = None) -> JobRecord | None:
    """``JobStore.get`` on an asyncio client (the API's hot read path: no thread hop)."""
    return _visible(decode(await client.hgetall(job_key(job_id))), tenant)


def read_event(fields: Any) -> tuple[str, JobRecord]:
    """An entry of a job's event stream: the event's name and the record after it."""
    decoded = decode(fields)
    return decoded.pop("event", "progress"), JobRecord.from_hash(decoded)


class JobStore:
    """Reads and changes job records. Used by the API (create, read, cancel) and workers (the rest)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 30 * 24 * 3600):
        self.r = client
        self.ttl_s = ttl_s
        self._update = client.register_script(_UPDATE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    # ------------------------------------------------------------------ API side
    def create(
        self,
        job_id: str,
        *,
        tenant: str,
        kind: JobKind,
        request: dict,
        cohort_id: str | None = None,
        model_id: str | None = None,
        progress: JobProgress | None = None,
        warnings: list[str] | None = None,
    ) -> JobRecord:
        rec = JobRecord.new(
            job_id,
            tenant=tenant,
            kind=kind,
            request=request,
            created_at=now_iso(),
            cohort_id=cohort_id,
            model_id=model_id,
            progress=progress,
            warnings=warnings,
        )
        fields: dict[Any, Any] = rec.to_hash()  # redis-py's parameter types want its own key union
        with self.r.pipeline() as p:
            p.hset(job_key(job_id), mapping=fields)
            p.xadd(events_key(job_id), {"event": "state", **fields}, maxlen=EVENTS_MAXLEN, approximate=True)
            p.zadd(tenant_jobs_key(tenant), {job_id: time.time()})
            p.sadd(ACTIVE_KEY, job_id)
            p.execute()
        return rec

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The record, or None if unknown or (when ``tenant`` is given) another tenant's."""
        return _visible(decode(self.r.hgetall(job_key(job_id))), tenant)

    def list_ids(self, tenant: str, limit: int = 100) -> list[str]:
        return [_s(x) for x in self.r.zrevrange(tenant_jobs_key(tenant), 0, limit - 1)]

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Queued: cancelled at once. Running: the flag the task checks between steps."""
        if self.transition(job_id, {JobState.queued}, JobState.cancelled):
            return self.get(job_id)
        self.update(job_id, {"cancel": "1"}, allowed={JobState.running}, event="cancel_requested")
        return self.get(job_id)

    # ------------------------------------------------------------------ worker side
    def update(
        self,
        job_id: str,
        fields: Mapping[str, str],
        *,
        allowed: Iterable[JobState] | None = None,
        event: str = "progress",
    ) -> int:
        """Set ``fields`` if the state is one of ``allowed`` (any if None). 1 done, 0 refused, -1 unknown."""
        states = ",".join(s.value for s in allowed) if allowed is not None else ""
        args: list[str] = [states, event, str(EVENTS_MAXLEN)]
        for k, v in fields.items():
            args += [k, v]
        return int(self._update(keys=[job_key(job_id), events_key(job_id)], args=args))

    def transition(
        self, job_id: str, allowed: Iterable[JobState], to: JobState, fields: Mapping[str, str] | None = None
    ) -> bool:
        extra = dict(fields or {})
        extra["state"] = to.value
        if to == JobState.running:
            extra.setdefault("started_at", now_iso())
        if to in TERMINAL_STATES:
            extra["finished_at"] = now_iso()
        ok = self.update(job_id, extra, allowed=allowed, event="state") == 1
        if ok and to in TERMINAL_STATES:
            with self.r.pipeline() as p:
                p.srem(ACTIVE_KEY, job_id)
                p.expire(job_key(job_id), self.ttl_s)
                p.expire(events_key(job_id), self.ttl_s)
                p.execute()
        return ok

    def set_progress(self, job_id: str, progress: JobProgress) -> bool:
        return self.update(job_id, {"progress": progress.model_dump_json()}, allowed={JobState.running}) == 1

    def fail(self, job_id: str, error: JobError) -> bool:
        return self.transition(
            job_id, {JobState.queued, JobState.running}, JobState.failed, {"error": error.model_dump_json()}
        )

    def add_warnings(self, job_id: str, warnings: list[str]) -> None:
        """Append warnings to a running job's record (they reach the SSE stream with the next event)."""
        rec = self.get(job_id)
        if rec is not None and warnings:
            merged = json.dumps([*rec.warnings, *warnings])
            self.update(job_id, {"warnings": merged}, allowed={JobState.running}, event="warning")

    def count_attempt(self, job_id: str) -> int:
        """One more delivery of the job has started running it; returns the count."""
        return int(self.r.hincrby(job_key(job_id), "attempts", 1))

    def cancel_requested(self, job_id: str) -> bool:
        v = self.r.hget(job_key(job_id), "cancel")
        return v is not None and _s(v) == "1"

    def active_ids(self) -> list[str]:
        return sorted(_s(x) for x in self.r.smembers(ACTIVE_KEY))

    def active_for(self, tenant: str) -> list[str]:
        """The tenant's jobs that are queued or running."""
        ids = self.active_ids()
        with self.r.pipeline() as p:
            for job_id in ids:
                p.hget(job_key(job_id), "tenant")
            owners = p.execute()
        return [job_id for job_id, owner in zip(ids, owners, strict=True) if owner and _s(owner) == tenant]

    # ------------------------------------------------------------------ leases
    def acquire_lease(self, job_id: str, lease_s: float, wait_s: float = 0.0) -> str | None:
        """Take the job's lease, waiting up to ``wait_s`` for a dead holder's lease to expire."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while True:
            if self.r.set(lease_key(job_id), token, nx=True, px=int(lease_s * 1000)):
                return token
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.25, max(0.01, deadline - time.monotonic())))

    def renew_lease(self, job_id: str, token: str, lease_s: float) -> bool:
        """Extend our lease; if it expired while Redis was away, take it again unless someone else has."""
        if self._renew(keys=[lease_key(job_id)], args=[token, int(lease_s * 1000)]):
            return True
        return bool(self.r.set(lease_key(job_id), token, nx=True, px=int(lease_s * 1000)))

    def release_lease(self, job_id: str, token: str) -> None:
        self._release(keys=[lease_key(job_id)], args=[token])

    def lease_holder(self, job_id: str) -> str | None:
        v = self.r.get(lease_key(job_id))
        return _s(v) if v is not None else None
