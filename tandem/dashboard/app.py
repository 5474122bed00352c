"""The live dashboard: collects service metrics into a time series and serves a page.

Sources are either in-process registries (``tandem demo``) or remote services'
``/metrics.json`` endpoints (``tandem serve dashboard`` in docker compose). The page
(static/index.html, no CDN) polls ``/api/series`` and draws the charts on <canvas>.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from tandem.services.metrics import History, Registry, add_metrics_routes

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

#: Counters charted as per-second rates.
RATE_COUNTERS: tuple[str, ...] = ("events_applied", "update_bytes", "events_replayed")

#: Fields the page charts (the JSON contract between the collector and index.html).
CHART_FIELDS: tuple[str, ...] = (
    "events_applied_per_s",
    "events_applied",
    "user_events_applied",
    "events_observed",
    "events_replayed",
    "model_version",
    "prequential_ndcg",
    "prequential_hr",
    "update_bytes",
    "update_bytes_per_s",
    "rerank_latency_seconds_p50",
    "rerank_latency_seconds_p95",
    "events_dead_lettered",
    "updates_applied",
    "updates_rejected",
    "consumer_lag",
    "replay_lag",
)

#: Labelled counter of the cloud's dead letters (``{"<topic>: <reason>": count}``), shown as a table.
DEAD_LETTERS = "dead_letters_by_reason"


def derived(point: dict[str, Any]) -> dict[str, Any]:
    """Fields computed from several services' metrics in one point.

    ``replay_lag``: user events the replayer sent that the cloud has not applied yet
    (``events_replayed - user_events_applied``, or ``events_applied`` from an older cloud);
    present only when both sides report. Dead-lettered events stay in it: they were never applied.
    """
    applied = point.get("user_events_applied", point.get("events_applied"))
    replayed = point.get("events_replayed")
    if not isinstance(applied, (int, float)) or not isinstance(replayed, (int, float)):
        return {}
    return {"replay_lag": max(0.0, float(replayed) - float(applied))}


def parse_sources(sources: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["cloud=http://cloud:8000", ...]`` -> ``{"cloud": "http://cloud:8000"}``."""
    out: dict[str, str] = {}
    for item in sources:
        name, _, url = item.partition("=")
        if not url:
            name, url = f"source{len(out)}", name
        out[name.strip()] = url.strip().rstrip("/")
    return out


class Collector:
    """Samples metrics every ``poll_s`` into a bounded ``History``.

    Args:
        registries: in-process registries to sample directly.
        remote: ``{name: base_url}`` of services whose ``/metrics.json`` is scraped.
        poll_s: sampling period.
        extra: optional callable adding fields (e.g. demo phase) to each point.
    """

    def __init__(
        self,
        registries: list[Registry] | None = None,
        remote: dict[str, str] | None = None,
        poll_s: float = 1.0,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.registries = registries or []
        self.remote = remote or {}
        self.poll_s = poll_s
        self.extra = extra
        self.history = History(self.registries, rate_of=RATE_COUNTERS, derive=derived)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dashboard-collector", daemon=True)
        self._client = httpx.Client(timeout=2.0)
        self.up: dict[str, bool] = {}

    def _scrape(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for name, url in self.remote.items():
            try:
                resp = self._client.get(f"{url}/metrics.json")
                resp.raise_for_status()
                data = resp.json()
                for key, value in data.items():
                    if isinstance(value, (int, float)) and key != "time":
                        merged[key] = value
                    elif isinstance(value, dict):  # a labelled counter
                        merged[key] = {str(k): v for k, v in value.items() if isinstance(v, (int, float))}
                self.up[name] = True
            except (httpx.HTTPError, ValueError) as exc:
                if self.up.get(name, True):
                    log.warning("metrics source %s (%s) unavailable: %s", name, url, exc)
                self.up[name] = False
        return merged

    def sample(self) -> dict[str, Any]:
        """Take one point now (also called by the loop)."""
        extra = self._scrape() if self.remote else {}
        if self.extra is not None:
            extra.update(self.extra())
        return self.history.sample(extra)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the collector must keep sampling
                log.exception("dashboard sample failed")
            self._stop.wait(self.poll_s)

    def start(self) -> "Collector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._client.close()


def create_app(collector: Collector, title: str = "Tandem live") -> FastAPI:
    """The dashboard app: ``/`` (page), ``/api/series``, ``/api/latest``, ``/healthz``, ``/metrics``."""
    app = FastAPI(title=title)
    registry = Registry("dashboard")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)  # type: ignore[return-value]
        return FileResponse(path)

    @app.get("/api/series")
    def series(since: float = 0.0) -> dict[str, Any]:
        points = collector.history.series(since)
        fields = list(CHART_FIELDS) + ["phase", "done"]
        everything = collector.history.series()
        return {
            "title": title,
            "now": time.time(),
            "sources": collector.up,
            "points": [{"t": p["time"], **{k: p[k] for k in fields if k in p}} for p in points],
            DEAD_LETTERS: dict(everything[-1].get(DEAD_LETTERS, {})) if everything else {},
        }

    @app.get("/api/latest")
    def latest() -> dict[str, Any]:
        pts = collector.history.series()
        return pts[-1] if pts else {}

    return add_metrics_routes(app, registry, health=lambda: {"points": len(collector.history.points)})
