"""What ingest did: one report type for a write batch and for a whole run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.pipeline.stages import STAGES, ItemResult, Outcome


@dataclass
class BatchReport:
    """Results plus where the time went.

    For one write batch (the worker's metrics): ``wall_seconds`` runs from the oldest
    event's submission to the confirmed write. For a run (``run_all``): the run's wall time.
    ``stage_seconds`` are busy seconds; fetch and decode are summed over their threads.
    """

    results: list[ItemResult] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall_seconds: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def failures(self) -> list[ItemResult]:
        return [r for r in self.results if r.outcome == "failed"]

    def add_stage_seconds(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + value

    def extend(self, results: Iterable[ItemResult]) -> None:
        self.results.extend(results)

    def summary(self) -> str:
        stages = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.stage_seconds.items())
        return (
            f"n={len(self.results)} stored={self.count('stored')} deleted={self.count('deleted')} "
            f"unchanged={self.count('unchanged')} failed={self.count('failed')} "
            f"wall={self.wall_seconds * 1000:.0f}ms {stages}"
        )
