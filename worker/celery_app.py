"""The workers' Celery application: ``celery -A worker.celery_app worker --pool=prefork --concurrency=1``.

Nothing here imports torch or the engine: tasks load them lazily in the child process, so the
parent never touches CUDA and a forked child starts clean.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from runtime.celeryconf import celery_config
from worker.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("dhvae")
app.conf.update(celery_config(get_settings()))
app.conf.include = ["worker.tasks"]


@worker_ready.connect
def _start_janitor(sender=None, **_: object) -> None:
    from worker.janitor import start

    start(app, get_settings())


@worker_shutting_down.connect
def _stop_janitor(**_: object) -> None:
    from worker.janitor import stop

    stop()
