"""Celery configuration both sides use (a plain dict: this package does not import Celery)."""

from __future__ import annotations

from runtime.settings import CommonSettings


def celery_config(settings: CommonSettings) -> dict:
    return {
        "broker_url": settings.require_redis_url(),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a Redis restart must not kill the worker
        # The Redis transport redelivers an unacknowledged message after this long: it must exceed the
        # longest job, or a job still running is started a second time.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_default_queue": settings.queue,
        "task_acks_late": True,  # acknowledged when the task ends, so a killed worker's job is redelivered
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # a worker holds no job it is not running
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_ignore_result": True,  # job state lives in our own Redis records (runtime.jobs)
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }
