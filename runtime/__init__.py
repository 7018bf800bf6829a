"""What the API and the workers share at run time: the Redis job store (``jobs.py``), the storage of
cohorts, models and outputs (``storage.py``), the settings both read (``settings.py``) and the Celery
configuration (``celeryconf.py``)."""
