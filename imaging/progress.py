"""Progress reports and cooperative cancellation, shared by training, sampling and the pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Cancelled


@dataclass
class Progress:
    """One progress report: ``done`` of ``total`` ``unit`` in ``stage``, with an ETA and scalars to log."""

    stage: str  # "ingest" | "train" | "generate" | "export"
    done: int
    total: int
    unit: str  # "steps" | "pairs" | "cases"
    eta_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


class Reporter:
    """Turns counts into :class:`Progress` reports with a rate and ETA, and checks for cancellation."""

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
        start: int = 0,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self._progress, self._should_stop = progress, should_stop
        self._t0, self._start = time.perf_counter(), start

    def check_cancelled(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise Cancelled(f"{self.stage} cancelled")

    def rate(self, done: int) -> float:
        """Units per second since this reporter started (resumed work excluded)."""
        elapsed = time.perf_counter() - self._t0
        return (done - self._start) / elapsed if elapsed > 0 and done > self._start else 0.0

    def report(self, done: int, **metrics: float) -> None:
        if self._progress is None:
            return
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else None
        self._progress(Progress(self.stage, done, self.total, self.unit, eta, dict(metrics)))
