"""Python client of the dHVAE augmentation service (httpx + tqdm; no torch).

from dhvae_client import Client
c = Client("http://127.0.0.1:8000", key)
job = c.augment(c.upload_cohort("cohort/"), n_pairs=500, preset="small", steps=2000, seed=1)
job.wait().download("augmented/")
"""

from .client import Client, Cohort, Job, verify_dataset
from .errors import (
    AuthError,
    BadRequest,
    CohortInvalid,
    Conflict,
    IntegrityError,
    JobFailed,
    NotFound,
    Problem,
    QuotaExceeded,
    ServiceError,
    TooLarge,
    TooManyJobs,
    Unavailable,
    UnsupportedMedia,
)

__version__ = "0.1.0"
__all__ = [
    "AuthError",
    "BadRequest",
    "Client",
    "Cohort",
    "CohortInvalid",
    "Conflict",
    "IntegrityError",
    "Job",
    "JobFailed",
    "NotFound",
    "Problem",
    "QuotaExceeded",
    "ServiceError",
    "TooLarge",
    "TooManyJobs",
    "Unavailable",
    "UnsupportedMedia",
    "verify_dataset",
]
