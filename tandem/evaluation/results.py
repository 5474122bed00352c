"""Result containers of an evaluation run, and their JSON form (results.json).

Per-prediction arrays stay in memory (``StrategyResult.points``) for tests and
plots; the JSON keeps summaries only, so it stays small and diffable.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.evaluation.bootstrap import CI

logger = logging.getLogger(__name__)


@dataclass
class Points:
    """Per-prediction arrays of one strategy (same order for every strategy of a run)."""

    user: np.ndarray
    ts_ms: np.ndarray
    rank: np.ndarray
    repeat: np.ndarray
    recall: np.ndarray


@dataclass
class StrategyResult:
    """Summary of one strategy (or baseline) over a run."""

    label: str
    name: str
    kind: str  # "strategy" | "baseline"
    describe: dict[str, Any]
    n_points: int
    metrics: dict[str, CI]
    repeat_metrics: dict[str, CI] = field(default_factory=dict)
    new_metrics: dict[str, CI] = field(default_factory=dict)
    repeat_share: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_per_device_day: float = 0.0
    bytes_down_per_device_day: float = 0.0
    bytes_request_per_device_day: float = 0.0  # the session each fetch carries (feature collaboration at request time)
    uploads: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    latency_samples_ms: list[float] = field(default_factory=list)
    staleness: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    round_summaries: list[dict[str, Any]] = field(default_factory=list)
    vs_reference: dict[str, CI] = field(default_factory=dict)
    timeseries: dict[str, list[float]] = field(default_factory=dict)
    points: Points | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "name": self.name,
            "kind": self.kind,
            "describe": self.describe,
            "n_points": self.n_points,
            "metrics": {k: v.as_dict() for k, v in self.metrics.items()},
            "repeat_metrics": {k: v.as_dict() for k, v in self.repeat_metrics.items()},
            "new_metrics": {k: v.as_dict() for k, v in self.new_metrics.items()},
            "repeat_share": self.repeat_share,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_up_per_device_day": self.bytes_up_per_device_day,
            "bytes_down_per_device_day": self.bytes_down_per_device_day,
            "bytes_request_per_device_day": self.bytes_request_per_device_day,
            "uploads": self.uploads,
            "rejected": self.rejected,
            "latency": self.latency,
            "staleness": self.staleness,
            "rounds": self.rounds,
            "vs_reference": {k: v.as_dict() for k, v in self.vs_reference.items()},
            "timeseries": self.timeseries,
            "round_summaries_tail": self.round_summaries[-3:],
        }


@dataclass
class EvaluationResult:
    """Everything one ``tandem evaluate`` run produced."""

    source: str
    n_events: int
    n_points: int
    n_users: int
    n_items: int
    device_days: int
    config: dict[str, Any]
    results: list[StrategyResult]
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    reference: str = "cloud-only"
    frontier: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, label: str) -> StrategyResult:
        for r in self.results:
            if r.label == label:
                return r
        raise KeyError(label)

    def labels(self) -> list[str]:
        return [r.label for r in self.results]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_events": self.n_events,
            "n_points": self.n_points,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "device_days": self.device_days,
            "config": self.config,
            "reference": self.reference,
            "wall_s": self.wall_s,
            "timings": self.timings,
            "results": [r.to_json() for r in self.results],
            "frontier": self.frontier,
            "notes": self.notes,
        }

    def write_json(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_clean(self.to_json()), indent=1, sort_keys=False))
        return path


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x
