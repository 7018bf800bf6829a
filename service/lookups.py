"""Finding a tenant's cohorts and models (404 for what is not theirs) and creating model records."""

from __future__ import annotations

from contract.jobs import now_iso
from contract.schemas import ModelStatus
from service.deps import Context
from service.errors import ApiError, not_found


def require_cohort(ctx: Context, tenant: str, cohort_id: str) -> dict:
    record = ctx.storage.read_record(tenant, "cohorts", cohort_id)
    if record is None:
        raise not_found("cohort", cohort_id)
    return record


def require_model(ctx: Context, tenant: str, model_id: str, *, ready: bool = True) -> dict:
    record = ctx.storage.read_record(tenant, "models", model_id)
    if record is None:
        raise not_found("model", model_id)
    if ready and record.get("status") != ModelStatus.ready.value:
        raise ApiError(409, f"model {model_id} is {record.get('status')}, not ready")
    return record


def create_model_record(ctx: Context, tenant: str, model_id: str, **fields: object) -> dict:
    record = {"id": model_id, "status": ModelStatus.training.value, "created_at": now_iso(), **fields}
    ctx.storage.write_record(tenant, "models", model_id, record)
    return record


def check_max(value: int, limit: int, name: str) -> None:
    if value > limit:
        raise ApiError(422, f"{name}={value} exceeds this service's limit of {limit}")
