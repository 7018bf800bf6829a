"""The wire format shared by the API (``service/``) and the workers (``worker/``): request and response
bodies, task payloads and names, job states, and the typed records of cohorts and models.

Both sides import this package and never each other. It imports nothing of ours, no torch, FastAPI or
Celery (``tests/test_imports.py``); what the two sides share at run time is in ``runtime/``.
"""
