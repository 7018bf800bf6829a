"""Celery task names. The API enqueues by these names (``send_task``); the worker registers them."""

from __future__ import annotations

TRAIN = "dhvae.train"
GENERATE = "dhvae.generate"
AUGMENT = "dhvae.augment"
IMPORT_MODEL = "dhvae.import_model"
EVALUATE = "dhvae.evaluate"
