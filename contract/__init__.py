"""The wire format shared by the API (``service/``) and the workers (``worker/``).

Both sides import this package and never each other: request/response schemas, Celery task names,
job states, the Redis job records, the storage layout and the settings they have in common.
Nothing here imports torch, FastAPI or Celery.
"""
