"""Exceptions a user can act on. Every message names the file or setting at fault and what to do."""

from __future__ import annotations

from dataclasses import dataclass


class DHVAEError(Exception):
    """Base class of every error of this package that is meant for the user."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input file (path relative to the cohort root when possible)."""

    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


class CohortError(DHVAEError):
    """The cohort cannot be used; ``problems`` lists every file at fault."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cohort rejected ({len(self.problems)} problem(s)):\n{lines}")


class CheckpointError(DHVAEError):
    """A checkpoint file is missing, corrupt, or does not match a known configuration."""


class TrainingDiverged(DHVAEError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class LowAcceptance(DHVAEError):
    """Too few generated pairs pass the mask-area floor to reach the requested count."""


class Cancelled(DHVAEError):
    """The job was cancelled cooperatively between two steps."""


class WeightsMissing(DHVAEError):
    """The ImageNet VGG16 weights for the perceptual loss are not installed."""
