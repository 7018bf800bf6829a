"""The records the API and the workers read and write (``record.json`` of each stored object), typed.

Written through ``runtime.storage.LocalStorage`` and nowhere else, so no dict key is shared by
convention: a field is declared here once and both sides see the same type and default.
"""

from __future__ import annotations

from pydantic import Field

from contract.schemas import CohortOut, ModelOut


class CohortRecord(CohortOut):
    """A stored cohort: its public view plus where its files are inside the cohort's folder."""

    root: str = Field("files", description="Folder of the extracted cohort, relative to the cohort's folder.")


class ModelRecord(ModelOut):
    """A model (trained here or imported): the public view is the whole record."""


Record = CohortRecord | ModelRecord
