"""Re-queue the jobs of workers that died, without waiting for the visibility timeout.

With the Redis transport, a delivered message sits in kombu's ``unacked`` hash until the task ends
(late acks). If the pool child dies, Celery re-queues it at once (``task_reject_on_worker_lost``); if
the whole worker dies (kill -9 of the main process, a lost machine), only the visibility timeout would
bring it back, and that must exceed the longest job: days. A running job holds a lease that its
worker renews every few seconds (``worker.jobrun``); so an unacked message older than two leases whose
job holds no lease belongs to a dead worker, and this thread, in every worker's main process, puts it
back on its queue. Restoring by mistake is harmless: the lease lets only one delivery run the job.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from celery import Celery

from runtime.jobs import JobStore
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_stop = threading.Event()
_thread: threading.Thread | None = None


def sweep(app: Celery, jobs: JobStore, min_age_s: float) -> list[str]:
    """Re-queue orphaned messages once; return their job ids."""
    restored = []
    with app.connection_for_write() as conn:
        chan = conn.default_channel
        client = chan.client
        ceil = time.time() - min_age_s
        for tag, _score in client.zrange(chan.unacked_index_key, 0, ceil, byscore=True, withscores=True):
            raw = client.hget(chan.unacked_key, tag)
            if not raw:
                continue
            message = json.loads(raw)[0]
            job_id = (message.get("headers") or {}).get("id")
            if not job_id or jobs.lease_holder(job_id):
                continue
            chan.qos.restore_by_tag(tag, client)
            restored.append(job_id)
    if restored:
        log.warning("re-queued %d job(s) whose worker is gone: %s", len(restored), ", ".join(restored))
    return restored


def start(app: Celery, settings: WorkerSettings) -> None:
    global _thread
    if settings.janitor_interval_s <= 0 or (_thread and _thread.is_alive()):
        return
    from worker.jobrun import job_store

    jobs = job_store()
    min_age = 2 * settings.job_lease_s
    _stop.clear()

    def loop() -> None:
        while True:
            try:
                sweep(app, jobs, min_age)
            except Exception as e:  # Redis away: try again next round
                log.warning("janitor sweep failed: %s", e)
            if _stop.wait(settings.janitor_interval_s):
                return

    _thread = threading.Thread(target=loop, name="dhvae-janitor", daemon=True)
    _thread.start()


def stop() -> None:
    _stop.set()
