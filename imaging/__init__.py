"""Torch-free medical-image I/O: cohort reading and validation, preprocessing, NIfTI writing, the nnU-Net
export and its resume journal, phantoms, errors and progress.

The API process imports this package (it validates uploads with it), so nothing here imports torch or
any other package of ours; ``tests/test_imports.py`` checks both.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dhvae-augment")  # the one version number: pyproject.toml's
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
