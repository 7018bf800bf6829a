"""The dHVAE engine: cohort ingestion, the model, training, sampling and NIfTI export.

Importing this package imports nothing heavy: the torch-free service uses ``models.cohort`` and
``models.preprocess`` to validate uploads.
"""

__version__ = "0.1.0"
