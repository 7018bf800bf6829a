"""Finding a tenant's cohorts and models (404 for what is not theirs) and creating model records."""

from __future__ import annotations

from contract.records import CohortRecord, ModelRecord
from contract.schemas import ModelStatus
from runtime.jobs import now_iso
from service.deps import Context
from service.errors import ApiError, not_found


def require_cohort(ctx: Context, tenant: str, cohort_id: str) -> CohortRecord:
    record = ctx.storage.read(tenant, CohortRecord, cohort_id)
    if record is None:
        raise not_found("cohort", cohort_id)
    return record


def require_model(ctx: Context, tenant: str, model_id: str, *, ready: bool = True) -> ModelRecord:
    record = ctx.storage.read(tenant, ModelRecord, model_id)
    if record is None:
        raise not_found("model", model_id)
    if ready and record.status != ModelStatus.ready:
        raise ApiError(409, f"model {model_id} is {record.status.value}, not ready")
    return record


def create_model_record(ctx: Context, tenant: str, model_id: str, **fields: object) -> ModelRecord:
    """Reserve a model id (status ``training``: not usable until its job succeeds)."""
    record = ModelRecord.model_validate(
        {"id": model_id, "status": ModelStatus.training, "created_at": now_iso(), **fields}
    )
    ctx.storage.write(tenant, record)
    return record


def check_max(value: int, limit: int, name: str) -> None:
    if value > limit:
        raise ApiError(422, f"{name}={value} exceeds this service's limit of {limit}")
