"""Process metrics for the services: counters, gauges and latency summaries.

One ``Registry`` per service; it renders the Prometheus text format (``/metrics``)
and a JSON snapshot (``/metrics.json``) that the dashboard polls. A counter may carry one
label (``inc(name, labels={"reason": ...})``, at most ``MAX_LABEL_VALUES`` values per counter, the
rest counted as ``other``); it appears in the snapshot as ``{name: {value: count}}``. ``History`` keeps a
bounded time series of snapshots so charts survive a page reload.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

log = logging.getLogger(__name__)

#: Distinct label values kept per labelled counter; further values are counted under "other".
MAX_LABEL_VALUES = 32


@dataclass
class Summary:
    """Recent observations (bounded reservoir) plus running count and sum."""

    window: int = 2048
    count: int = 0
    total: float = 0.0
    recent: Deque[float] = field(default_factory=collections.deque)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.recent.append(value)
        if len(self.recent) > self.window:
            self.recent.popleft()

    def quantile(self, q: float) -> float:
        if not self.recent:
            return 0.0
        return float(np.quantile(np.fromiter(self.recent, dtype=np.float64), q))


class Registry:
    """Thread-safe metrics of one service.

    Args:
        service: name used as the ``service`` label and in /healthz.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.started = time.time()
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {}
        self._gauges: dict[str, float] = {}
        self._summaries: dict[str, Summary] = {}
        self._labeled: dict[str, tuple[str, dict[str, float]]] = {}  # name -> (label key, {label value: count})
        self._help: dict[str, str] = {}

    def inc(self, name: str, value: float = 1.0, help: str = "", labels: dict[str, str] | None = None) -> None:
        """Add ``value`` to counter ``name``; with ``labels`` (one key), to that label value's count."""
        with self._lock:
            if labels:
                ((key, label),) = labels.items()
                _, counts = self._labeled.setdefault(name, (key, {}))
                if label not in counts and len(counts) >= MAX_LABEL_VALUES:
                    label = "other"
                counts[label] = counts.get(label, 0.0) + value
            else:
                self._counters[name] = self._counters.get(name, 0.0) + value
            if help:
                self._help[name] = help

    def labeled(self, name: str) -> dict[str, float]:
        """``{label value: count}`` of labelled counter ``name`` (empty when never incremented)."""
        with self._lock:
            return dict(self._labeled.get(name, ("", {}))[1])

    def set(self, name: str, value: float, help: str = "") -> None:
        """Set gauge ``name``."""
        with self._lock:
            self._gauges[name] = float(value)
            if help:
                self._help[name] = help

    def observe(self, name: str, value: float, help: str = "") -> None:
        """Record one observation (seconds, bytes, ...) in summary ``name``."""
        with self._lock:
            self._summaries.setdefault(name, Summary()).observe(float(value))
            if help:
                self._help[name] = help

    def counter(self, name: str) -> float:
        with self._lock:
            return self._counters.get(name, 0.0)

    def _process(self) -> dict[str, float]:
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cur = _current_rss_bytes()
        return {
            "process_rss_bytes": float(cur if cur else rss_kb * 1024),
            "process_max_rss_bytes": float(rss_kb * 1024),
            "process_uptime_seconds": time.time() - self.started,
        }

    def snapshot(self) -> dict[str, Any]:
        """All metrics as one flat JSON-able dict (summaries as _count/_sum/_p50/_p95)."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out.update(self._gauges)
            out.update({name: dict(counts) for name, (_, counts) in self._labeled.items()})
            for name, s in self._summaries.items():
                out[f"{name}_count"] = s.count
                out[f"{name}_sum"] = s.total
                out[f"{name}_p50"] = s.quantile(0.5)
                out[f"{name}_p95"] = s.quantile(0.95)
        out.update(self._process())
        out["service"] = self.service
        out["time"] = time.time()
        return out

    def prometheus(self) -> str:
        """The Prometheus text exposition format."""
        lines: list[str] = []
        label = f'{{service="{self.service}"}}'
        snap = self.snapshot()
        with self._lock:
            counters = dict(self._counters)
            summaries = {k: (v.count, v.total, v.quantile(0.5), v.quantile(0.95)) for k, v in self._summaries.items()}
            helps = dict(self._help)
            labeled = {name: (key, dict(counts)) for name, (key, counts) in self._labeled.items()}
        for name, value in sorted(counters.items()):
            metric = f"tandem_{name}_total"
            lines += [f"# HELP {metric} {helps.get(name, name)}", f"# TYPE {metric} counter", f"{metric}{label} {value}"]
        for name, (key, counts) in sorted(labeled.items()):
            metric = f"tandem_{name}_total"
            lines += [f"# HELP {metric} {helps.get(name, name)}", f"# TYPE {metric} counter"]
            lines += [f'{metric}{{service="{self.service}",{key}="{_escape(v)}"}} {c}' for v, c in sorted(counts.items())]
        for name, value in sorted(snap.items()):
            if name in counters or name in ("service", "time") or not isinstance(value, (int, float)):
                continue
            if any(name.startswith(s + "_") for s in summaries):
                continue
            metric = f"tandem_{name}"
            lines += [f"# HELP {metric} {helps.get(name, name)}", f"# TYPE {metric} gauge", f"{metric}{label} {value}"]
        for name, (count, total, p50, p95) in sorted(summaries.items()):
            metric = f"tandem_{name}"
            lines += [
                f"# HELP {metric} {helps.get(name, name)}",
                f"# TYPE {metric} summary",
                f'{metric}{{service="{self.service}",quantile="0.5"}} {p50}',
                f'{metric}{{service="{self.service}",quantile="0.95"}} {p95}',
                f"{metric}_count{label} {count}",
                f"{metric}_sum{label} {total}",
            ]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), 0 where unavailable."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class History:
    """Bounded time series of registry snapshots, plus per-second rates of counters.

    Args:
        registries: the registries to sample (merged; later names win).
        max_points: points kept (oldest dropped).
        rate_of: counters whose per-second rate is added as ``<name>_per_s``.
        derive: adds fields computed from a whole point (e.g. a lag from two services' counters).
    """

    def __init__(
        self,
        registries: list[Registry],
        max_points: int = 600,
        rate_of: tuple[str, ...] = (),
        derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.registries = registries
        self.points: Deque[dict[str, Any]] = collections.deque(maxlen=max_points)
        self.rate_of = rate_of
        self.derive = derive
        self._lock = threading.Lock()

    def merged(self) -> dict[str, Any]:
        snap: dict[str, Any] = {}
        for reg in self.registries:
            snap.update(reg.snapshot())
        return snap

    def sample(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take one point now; returns it."""
        point = self.merged()
        if extra:
            point.update(extra)
        if self.derive is not None:
            point.update(self.derive(point))
        point["time"] = time.time()
        with self._lock:
            # rate over the last few samples: smooth, but still responsive
            prev = self.points[-min(3, len(self.points))] if self.points else None
            for name in self.rate_of:
                if prev is None:
                    point[f"{name}_per_s"] = 0.0
                    continue
                dt = max(1e-6, point["time"] - prev["time"])
                point[f"{name}_per_s"] = max(0.0, (point.get(name, 0.0) - prev.get(name, 0.0)) / dt)
            self.points.append(point)
        return point

    def series(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self.points if p["time"] > since]


def add_metrics_routes(app: FastAPI, registry: Registry, health: "callable[[], dict[str, Any]] | None" = None) -> FastAPI:  # type: ignore[valid-type]
    """Add ``/healthz``, ``/metrics`` (Prometheus) and ``/metrics.json`` to ``app``.

    Routes already defined on ``app`` (e.g. the recommender engine's ``/healthz``) are replaced so the
    service's registry is the one scraped.
    """
    for path in ("/healthz", "/metrics", "/metrics.json"):
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != path]

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        body: dict[str, Any] = {"service": registry.service, "status": "ok"}
        if health is not None:
            body.update(health())
        code = 200 if body.get("status") == "ok" else 503
        return JSONResponse(body, status_code=code)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return registry.prometheus()

    @app.get("/metrics.json")
    def metrics_json() -> dict[str, Any]:
        return registry.snapshot()

    return app
