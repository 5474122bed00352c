"""Result containers of an evaluation run, and their JSON form (results.json).

Per-prediction arrays stay in memory (``StrategyResult.points``) for tests and
plots; the JSON keeps summaries only, so it stays small and diffable.
``EvaluationResult.from_json`` reads a results.json back (summaries only), and
``provenance()`` records what produced a run (git SHA, package versions, command, seed).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import time
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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StrategyResult":
        """Inverse of ``to_json`` (summaries only: no points, no latency samples)."""

        def cis(d: dict[str, Any] | None) -> dict[str, CI]:
            return {k: _ci(v) for k, v in (d or {}).items()}

        return cls(
            label=data["label"],
            name=data.get("name", data["label"]),
            kind=data.get("kind", "strategy"),
            describe=data.get("describe", {}),
            n_points=int(data.get("n_points", 0)),
            metrics=cis(data.get("metrics")),
            repeat_metrics=cis(data.get("repeat_metrics")),
            new_metrics=cis(data.get("new_metrics")),
            repeat_share=_f(data.get("repeat_share", 0.0)),
            bytes_up=int(data.get("bytes_up") or 0),
            bytes_down=int(data.get("bytes_down") or 0),
            bytes_up_per_device_day=_f(data.get("bytes_up_per_device_day", 0.0)),
            bytes_down_per_device_day=_f(data.get("bytes_down_per_device_day", 0.0)),
            bytes_request_per_device_day=_f(data.get("bytes_request_per_device_day", 0.0)),
            uploads=int(data.get("uploads") or 0),
            rejected=dict(data.get("rejected") or {}),
            latency={k: _f(v) for k, v in (data.get("latency") or {}).items()},
            staleness={k: _f(v) for k, v in (data.get("staleness") or {}).items()},
            rounds=int(data.get("rounds") or 0),
            round_summaries=list(data.get("round_summaries_tail") or []),
            vs_reference=cis(data.get("vs_reference")),
            timeseries={k: [_f(x) for x in v] for k, v in (data.get("timeseries") or {}).items()},
        )

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
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | Path) -> "EvaluationResult":
        """Read a run back from results.json (a path) or its parsed dict; per-point arrays are not stored."""
        if isinstance(data, (str, Path)):
            data = json.loads(Path(data).read_text())
        return cls(
            source=data["source"],
            n_events=int(data.get("n_events", 0)),
            n_points=int(data.get("n_points", 0)),
            n_users=int(data.get("n_users", 0)),
            n_items=int(data.get("n_items", 0)),
            device_days=int(data.get("device_days", 0)),
            config=dict(data.get("config") or {}),
            results=[StrategyResult.from_json(r) for r in data.get("results", [])],
            wall_s=_f(data.get("wall_s", 0.0)),
            timings={k: _f(v) for k, v in (data.get("timings") or {}).items()},
            reference=data.get("reference", "cloud-only"),
            frontier=list(data.get("frontier") or []),
            notes=list(data.get("notes") or []),
            provenance=dict(data.get("provenance") or {}),
        )

    def to_frame(self) -> Any:
        """One row per strategy/baseline with every metric's mean and interval (a pandas DataFrame)."""
        import pandas as pd

        rows = []
        for r in self.results:
            row: dict[str, Any] = {"label": r.label, "kind": r.kind, "n_points": r.n_points}
            for m, ci in r.metrics.items():
                row[m], row[f"{m}_lo"], row[f"{m}_hi"] = ci.mean, ci.lo, ci.hi
            for m, ci in r.vs_reference.items():
                row[f"{m}_vs_ref"] = ci.mean
            row["bytes_up_per_device_day"] = r.bytes_up_per_device_day
            row["bytes_down_per_device_day"] = r.bytes_down_per_device_day
            rows.append(row)
        return pd.DataFrame(rows).set_index("label")

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
            "provenance": self.provenance,
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


def _f(x: Any) -> float:
    """JSON number or null -> float (null was a NaN or an infinity)."""
    return float("nan") if x is None else float(x)


def _ci(d: dict[str, Any]) -> CI:
    return CI(_f(d.get("mean")), _f(d.get("lo")), _f(d.get("hi")))


#: Packages whose versions decide a run's numbers (recorded in results.json).
PROVENANCE_PACKAGES: tuple[str, ...] = ("tandem", "torch", "torchrec", "fbgemm-gpu-cpu", "faiss-cpu", "numpy", "pandas")


def provenance(seed: int | None = None, argv: list[str] | None = None, repo: Path | None = None) -> dict[str, Any]:
    """What produced a run: git SHA (and whether the tree was dirty), package versions, command line, seed, time.

    Why: a results.json read months later must say which code and libraries made it (MLflow's run tags).
    """
    from importlib.metadata import PackageNotFoundError, version

    root = repo or Path(__file__).resolve().parents[2]
    sha, dirty = None, None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
        if sha:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
            dirty = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git on this machine: leave it unknown
        pass
    packages: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    args = list(sys.argv if argv is None else argv)
    if args:
        args[0] = Path(args[0]).name
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "command": shlex.join(args),
        "seed": seed,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
