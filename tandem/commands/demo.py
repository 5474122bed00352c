"""``tandem demo``: the whole topology in one process, with a live dashboard.

Replayer -> ``interactions`` -> cloud worker (train, refresh, serve candidates over HTTP)
and device fleet (fetch candidates over HTTP, rerank, send signed updates to
``device-updates`` -> cloud). Embedded file log by default; ``--kafka`` starts a local tansu
broker. Open the printed URL while it runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer

from tandem.commands._errors import check_positive, did_you_mean, fail
from tandem.commands._load import (
    EVENTS_HELP,
    LIMIT_HELP,
    SPEED_HELP,
    check_limit,
    hidden_source_option,
    parse_speed,
    source_argument,
    source_options,
)

log = logging.getLogger(__name__)


def find_browser() -> str | None:
    """A headless-capable Chromium/Chrome on PATH (installed by infra/setup-browser.sh)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(browser: str, profile: str, width: int, height: int) -> list[str]:
    """The headless Chromium command line both page captures share (no GPU, no sandbox, own profile)."""
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--virtual-time-budget=4000",
    ]


def _browser() -> str:
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no chromium found; run infra/setup-browser.sh")
    return browser


def screenshot(url: str, out: Path, width: int = 1400, height: int = 900, timeout_s: float = 60.0) -> Path:
    """Save a PNG of ``url`` rendered by headless Chromium (waits for the page's first polls)."""
    browser = _browser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tandem-chromium-") as profile:
        cmd = _headless(browser, profile, width, height) + [f"--screenshot={out}", url]
        subprocess.run(cmd, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def dump_dom(url: str, width: int = 1400, height: int = 900, timeout_s: float = 60.0) -> str:
    """The DOM of ``url`` after headless Chromium loaded it and ran its scripts (for render checks)."""
    with tempfile.TemporaryDirectory(prefix="tandem-chromium-") as profile:
        cmd = _headless(_browser(), profile, width, height) + ["--dump-dom", url]
        return subprocess.run(cmd, check=True, timeout=timeout_s, capture_output=True, text=True).stdout


class Demo:
    """The demo topology: replayer, cloud, fleet and dashboard in one process.

    Args:
        transport_url: ``embedded:/dir`` or ``kafka://host:port``.
        events: events to replay.
        source: log source (``synthetic`` by default).
        engine: cloud engine (``recommender`` or ``popular``).
        strategy: the collaboration strategy the cloud and the fleet run.
        port: dashboard port (0: any free port).
        speed: replay time compression (None: as fast as possible).
        refresh_every_events: cloud refresh cadence.
    """

    def __init__(
        self,
        transport_url: str,
        events: int = 20_000,
        source: str = "synthetic",
        engine: str = "recommender",
        port: int = 8080,
        speed: float | None = None,
        refresh_every_events: int = 2_000,
        strategy: str = "feature",
    ) -> None:
        from tandem.services.runtime import open_transport
        from tandem.dashboard.app import Collector, create_app
        from tandem.services.cloud_service import build
        from tandem.services.fleet_service import FleetWorker
        from tandem.services.replayer_service import Replayer
        from tandem.services.runtime import HttpServer
        from tandem.services.settings import CloudSettings, FleetSettings, ReplayerSettings

        # The demo runs in dev mode unless a real key is given: a published key, announced.
        key = os.environ.get("TANDEM_DEVICE_KEY", "")
        self.dev_mode = not key
        self.cloud_settings = CloudSettings(
            transport=transport_url, engine=engine, strategy=strategy, refresh_every_events=refresh_every_events, checkpoint_dir="",
            device_key=key, dev_mode=self.dev_mode, source=source if engine == "recommender" else "", events=events,
        )  # fmt: skip
        self.cloud, cloud_app = build(self.cloud_settings, open_transport(transport_url))
        self.engine = self.cloud.engine
        self.cloud_http = HttpServer(cloud_app, "127.0.0.1", 0)
        self.replayer = Replayer(
            ReplayerSettings(transport=transport_url, source=source, events=events, speed=speed or 0.0), open_transport(transport_url)
        )
        self._fleet_args = (FleetSettings, transport_url, strategy, key)
        self.fleet: FleetWorker | None = None
        self.phase = "starting"
        self.collector = Collector([self.cloud.metrics, self.replayer.metrics], poll_s=1.0, extra=lambda: {"phase": self.phase})
        self.dashboard = HttpServer(create_app(self.collector, title=f"Tandem live · {source} · {strategy}"), "127.0.0.1", port)
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return self.dashboard.url

    def start(self) -> "Demo":
        from tandem.services.runtime import open_transport
        from tandem.services.fleet_service import FleetWorker

        self.cloud_http.start()
        fs, url, strategy, key = self._fleet_args
        settings = fs(transport=url, cloud_url=self.cloud_http.url, strategy=strategy, device_key=key, dev_mode=self.dev_mode)
        self.fleet = FleetWorker(settings, open_transport(url)).open()
        self.collector.registries.append(self.fleet.metrics)
        self.collector.start()
        self.dashboard.start()
        self.phase = "replaying"
        for name, target in (("cloud", self.cloud.run), ("fleet", self.fleet.run), ("replayer", self.replayer.run)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def caught_up(self) -> bool:
        """Replay finished and the cloud has applied (or dead-lettered) every replayed event."""
        if not self.replayer.done.is_set():
            return False
        st = self.cloud.state
        target = self.replayer.replayed - self.cloud.metrics.counter("events_dead_lettered")
        devices = self.fleet.events_observed if self.fleet is not None else target
        sent = self.fleet.updates_sent if self.fleet is not None else 0
        handled = st.updates_applied + len(self.cloud.pending_updates) + self.cloud.metrics.counter("updates_rejected")
        return st.events_applied - st.availability_applied >= target and devices >= target and handled >= sent

    def stop(self) -> None:
        self.phase = "stopping"
        self.replayer.stop()
        self.cloud.stop()
        if self.fleet is not None:
            self.fleet.stop()
        for t in self._threads:
            t.join(30)
        self.collector.sample()
        self.collector.stop()
        self.dashboard.stop()
        self.cloud_http.stop()
        if self.fleet is not None:
            self.fleet.close()
        self.cloud.close(checkpoint=False)
        self.replayer.transport.close()

    def summary(self) -> dict[str, Any]:
        c = self.cloud.metrics.snapshot()
        f = self.fleet.metrics.snapshot() if self.fleet else {}
        return {
            "events_replayed": self.replayer.replayed,
            "events_applied": self.cloud.state.events_applied - self.cloud.state.availability_applied,
            "availability_applied": self.cloud.state.availability_applied,
            "events_observed_by_devices": int(f.get("events_observed", 0)),
            "model_version": self.engine.version,
            "prequential_ndcg@10": round(c.get("prequential_ndcg", 0.0), 4),
            "prequential_hr@10": round(c.get("prequential_hr", 0.0), 4),
            "updates_sent": int(f.get("updates_sent", 0)),
            "updates_applied": int(c.get("updates_applied", 0)),
            "update_bytes": int(f.get("update_bytes", 0)),
            "rerank_p95_ms": round(1000 * f.get("rerank_latency_seconds_p95", 0.0), 3),
            "dead_letters": int(c.get("events_dead_lettered", 0) + c.get("updates_rejected", 0)),
        }


def candidates_curl(base_url: str, source: str, events: int) -> str:
    """A curl line that returns items: asked at the log's own clock (its last event), not the wall clock."""
    at = ""
    try:
        from tandem.services.replayer_service import load_log

        log_ = load_log(source, events)
        at = f"&at_ms={int(log_.events.ts_ms.iloc[-1])}"
        user = int(log_.events.user_id.iloc[-1])
    except Exception:  # the line is a hint; the demo runs without it
        user = 0
    return f"curl '{base_url}/candidates?user_id={user}&k=10{at}'"


def auto_speed(source: str, events: int, seconds: float = 60.0) -> float | None:
    """A pace that replays the log in about ``seconds``: at full speed the replay outruns the
    cloud, whose first refresh then comes after every device has already fetched an empty list."""
    from tandem.services.replayer_service import load_log

    ts = load_log(source, events).events.ts_ms
    span_s = (int(ts.max()) - int(ts.min())) / 1000.0 if len(ts) else 0.0
    return span_s / seconds if span_s > seconds else None


def run_demo(
    events: int,
    duration: float,
    port: int,
    kafka: bool,
    source: str,
    engine: str,
    speed: float | None,
    screenshot_path: Path | None = None,
    exit_when_done: bool = False,
    workdir: Path | None = None,
    strategy: str = "feature",
) -> dict[str, Any]:
    """Run the demo for ``duration`` seconds (or until caught up with ``exit_when_done``)."""
    from tandem.services.runtime import LocalBroker

    tmp = Path(tempfile.mkdtemp(prefix="tandem-demo-")) if workdir is None else workdir
    broker = LocalBroker(log_path=tmp / "broker.log").start() if kafka else None
    if kafka:  # short group sessions: the fleet joins (and rebalances) in seconds
        os.environ.setdefault("TANDEM_KAFKA_SESSION_TIMEOUT_MS", "6000")
    url = f"kafka://{broker.bootstrap}" if broker else f"embedded:{tmp / 'log'}"
    demo = Demo(url, events=events, source=source, engine=engine, port=port, speed=speed, strategy=strategy)
    try:
        demo.start()
        typer.echo(f"Tandem demo: dashboard at {demo.url}  (transport {url}, strategy {strategy})")
        if demo.dev_mode:
            typer.echo("dev mode: device updates are signed with a published key (set TANDEM_DEVICE_KEY for a real one)")
        typer.echo(f"candidates API: {demo.cloud_http.url}/candidates  try: {candidates_curl(demo.cloud_http.url, source, events)}")
        deadline = time.monotonic() + duration
        shot_taken = False
        while time.monotonic() < deadline:
            if demo.caught_up() and demo.phase != "done":
                demo.phase = "done"
                s = demo.summary()
                typer.echo(f"replay processed: {s['events_applied']:,} events applied, model v{s['model_version']}, {s['updates_applied']:,} device updates applied")
            if demo.phase == "done" and screenshot_path is not None and not shot_taken:
                time.sleep(2.5)  # let the dashboard take a final sample
                screenshot(demo.url, screenshot_path)
                shot_taken = True
                typer.echo(f"screenshot saved to {screenshot_path}")
            if demo.phase == "done" and exit_when_done and (shot_taken or screenshot_path is None):
                break
            time.sleep(0.5)
        if screenshot_path is not None and not shot_taken:
            screenshot(demo.url, screenshot_path)
        return demo.summary()
    finally:
        demo.stop()
        if broker is not None:
            broker.stop()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def register(app: typer.Typer) -> None:
    """Add ``tandem demo`` to the CLI."""

    @app.command("demo")
    def demo(
        source: str = source_argument(),
        source_opt: Optional[str] = hidden_source_option(),
        events: Optional[int] = typer.Option(None, "--events", help=EVENTS_HELP + " [default: 20000]"),
        limit: Optional[int] = typer.Option(None, "--limit", help=LIMIT_HELP + " [default: 20000]"),
        duration: float = typer.Option(120.0, "--duration", help="seconds to keep the topology and dashboard up"),
        port: int = typer.Option(8080, "--port", help="dashboard port (0: any free port)"),
        kafka: bool = typer.Option(False, "--kafka", help="use a local tansu Kafka broker instead of the embedded log"),
        engine: str = typer.Option("recommender", "--engine", help="cloud engine: recommender | popular"),
        strategy: str = typer.Option("feature", "--strategy", help="collaboration strategy the cloud and the fleet run"),
        speed: str = typer.Option("auto", "--speed", help=SPEED_HELP + "; auto: the replay takes about a minute"),
        screenshot_path: Optional[Path] = typer.Option(None, "--screenshot", help="save a dashboard PNG (headless chromium)"),
        exit_when_done: bool = typer.Option(False, "--exit-when-done", help="stop once the replay is fully processed"),
    ) -> None:
        """Run the whole topology locally (no Docker) with a live dashboard.

        Examples: tandem demo;  tandem demo --events 5000 --speed 3600x --exit-when-done;  tandem demo --strategy hybrid
        """
        from tandem.strategies import STRATEGIES

        source = source_opt or source
        pace = None if speed.strip().lower() == "auto" else parse_speed(speed)
        check_positive(duration, "--duration")
        check_positive(port, "--port", allow_zero=True)
        check_limit(limit)
        if engine not in ("recommender", "popular"):
            fail(f"--engine must be recommender or popular, got {engine!r}{did_you_mean(engine, ['recommender', 'popular'])}")
        if strategy not in STRATEGIES:
            fail(f"--strategy: unknown strategy {strategy!r}{did_you_mean(strategy, STRATEGIES)}; choose one of {', '.join(STRATEGIES)}")
        n = source_options(source, events, default_events=20_000).get("events") if source == "synthetic" else None
        n = limit or n or 20_000
        if screenshot_path is not None and find_browser() is None:
            fail("--screenshot needs chromium on PATH (run infra/setup-browser.sh)")
        if speed.strip().lower() == "auto":
            pace = auto_speed(source, n)
        summary = run_demo(n, duration, port, kafka, source, engine, pace, screenshot_path, exit_when_done, strategy=strategy)
        for key, value in summary.items():
            typer.echo(f"{key:>26}: {value}")
