"""The live dashboard: JSON API, a self-contained page, and charts that really render.

The render checks drive headless Chromium (infra/setup-browser.sh installs it) and look at
the PNG: every chart must contain pixels of its line colour.
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tandem.commands.demo import find_browser, screenshot
from tandem.dashboard.app import CHART_FIELDS, STATIC, Collector, create_app, parse_sources
from tandem.services.metrics import Registry
from tandem.services.runtime import HttpServer

ROOT = Path(__file__).resolve().parents[1]
LINE_BLUE = (0x4F, 0xC3, 0xF7)  # first series colour in static/index.html
LINE_ORANGE = (0xFF, 0xB7, 0x4D)
needs_browser = pytest.mark.skipif(find_browser() is None, reason="chromium not installed: run infra/setup-browser.sh")


def _fake_services(stop: threading.Event, cloud: Registry, fleet: Registry) -> None:
    """Metrics that move like a running topology."""
    i = 0
    while not stop.is_set():
        i += 1
        cloud.set("events_applied", 500 * i)
        cloud.set("model_version", 1 + i // 3)
        cloud.set("prequential_ndcg", 0.1 + 0.2 * (1 - math.exp(-i / 5)))
        cloud.set("prequential_hr", 0.2 + 0.3 * (1 - math.exp(-i / 5)))
        fleet.inc("update_bytes", 2000 + 100 * (i % 4))
        fleet.observe("rerank_latency_seconds", 0.001 + 0.0005 * (i % 3))
        stop.wait(0.1)


def test_page_is_self_contained() -> None:
    html = (STATIC / "index.html").read_text()
    assert "<canvas" in html
    assert not re.search(r"""(src|href)\s*=\s*["']https?://""", html), "no CDN: the demo runs offline"
    for field in ("events_applied_per_s", "model_version", "prequential_ndcg", "update_bytes", "rerank_latency_seconds_p95"):
        assert field in html and field in CHART_FIELDS


def test_parse_sources() -> None:
    assert parse_sources(["cloud=http://cloud:8000/", "http://x:1"]) == {"cloud": "http://cloud:8000", "source1": "http://x:1"}


def test_series_api() -> None:
    cloud, fleet = Registry("cloud"), Registry("fleet")
    col = Collector([cloud, fleet], poll_s=0.05)
    cloud.set("events_applied", 100)
    col.sample()
    time.sleep(0.05)
    cloud.set("events_applied", 300)
    fleet.inc("update_bytes", 1234)
    col.sample()
    client = TestClient(create_app(col, title="t"))
    assert "<canvas" in client.get("/").text
    data = client.get("/api/series").json()
    assert len(data["points"]) == 2
    last = data["points"][-1]
    assert last["events_applied"] == 300 and last["update_bytes"] == 1234 and last["events_applied_per_s"] > 0
    assert client.get("/api/series", params={"since": last["t"]}).json()["points"] == []
    assert client.get("/healthz").json()["status"] == "ok"


def test_remote_sources_scraped() -> None:
    """The compose dashboard scrapes services' /metrics.json over HTTP."""
    from fastapi import FastAPI

    from tandem.services.metrics import add_metrics_routes

    reg = Registry("cloud")
    reg.set("model_version", 4)
    with HttpServer(add_metrics_routes(FastAPI(), reg)) as srv:
        col = Collector(remote={"cloud": srv.url, "gone": "http://127.0.0.1:9"}, poll_s=0.1)
        point = col.sample()
        col.stop()
    assert point["model_version"] == 4 and col.up == {"cloud": True, "gone": False}


def test_dead_letter_reasons_and_lag_exposed() -> None:
    """Per-reason dead letters (a labelled counter) and replayed - applied lag reach /api/series and the page."""
    from fastapi import FastAPI

    from tandem.services.metrics import add_metrics_routes

    cloud, replayer = Registry("cloud"), Registry("replayer")
    replayer.set("events_replayed", 1000)
    cloud.set("user_events_applied", 940)
    cloud.inc("dead_letters_by_reason", labels={"reason": "interactions: out of schema"})
    cloud.inc("dead_letters_by_reason", 2, labels={"reason": "device-updates: replayed"})
    col = Collector([cloud, replayer], poll_s=0.05)
    col.sample()
    data = TestClient(create_app(col)).get("/api/series").json()
    assert data["points"][-1]["replay_lag"] == 60
    assert data["dead_letters_by_reason"] == {"interactions: out of schema": 1, "device-updates: replayed": 2}
    assert 'tandem_dead_letters_by_reason_total{service="cloud",reason="device-updates: replayed"} 2.0' in cloud.prometheus()
    html = (STATIC / "index.html").read_text()
    assert "replay_lag" in html and "dead_letters_by_reason" in html and "replay_lag" in CHART_FIELDS
    with HttpServer(add_metrics_routes(FastAPI(), cloud)) as srv:  # scraped from a remote cloud too
        remote = Collector(remote={"cloud": srv.url}, poll_s=0.1)
        point = remote.sample()
        remote.stop()
    assert point["dead_letters_by_reason"]["device-updates: replayed"] == 2 and "replay_lag" not in point


def test_label_values_are_bounded() -> None:
    from tandem.services.metrics import MAX_LABEL_VALUES

    reg = Registry("cloud")
    for i in range(MAX_LABEL_VALUES + 5):
        reg.inc("dead_letters_by_reason", labels={"reason": f"r{i}"})
    counts = reg.labeled("dead_letters_by_reason")
    assert len(counts) == MAX_LABEL_VALUES + 1 and counts["other"] == 5


def chart_pixels(png: Path, color: tuple[int, int, int], tol: int = 40) -> int:
    """Pixels within ``tol`` of ``color`` (the chart lines)."""
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(color)).sum(axis=2) < tol).sum())


@needs_browser
def test_charts_render_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    cloud, fleet = Registry("cloud"), Registry("fleet")
    stop = threading.Event()
    feeder = threading.Thread(target=_fake_services, args=(stop, cloud, fleet), daemon=True)
    feeder.start()
    col = Collector([cloud, fleet], poll_s=0.2).start()
    try:
        with HttpServer(create_app(col, title="Tandem render test")) as srv:
            time.sleep(2.0)  # ~10 samples
            png = screenshot(srv.url, tmp_path / "dash.png")
    finally:
        stop.set()
        col.stop()
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.shape[0] >= 800 and img.std() > 10, "the page is blank"
    assert chart_pixels(png, LINE_BLUE) > 1500, "chart lines missing"
    assert chart_pixels(png, LINE_ORANGE) > 100, "second series (HR / p95) missing"
    # every chart card has drawn something in its lower half (lines, not just the frame)
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    mask = (np.abs(rgb - np.array(LINE_BLUE)).sum(axis=2) < 40) | (np.abs(rgb - np.array(LINE_ORANGE)).sum(axis=2) < 40)
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    assert rows.max() > h * 0.6 and cols.min() < w * 0.35 and cols.max() > w * 0.65, "charts in every column and row"


@needs_browser
@pytest.mark.slow
def test_demo_end_to_end_with_screenshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tandem demo``: replay, cloud, fleet and dashboard in one process; the charts fill up."""
    from tandem.commands.demo import run_demo

    monkeypatch.setenv("TANDEM_DEV_MODE", "1")  # the demo runs without a secret key, announced (devices.master_key)

    png = tmp_path / "demo.png"
    summary = run_demo(
        events=3000, duration=90, port=0, kafka=False, source="synthetic", engine="popular", speed=None,
        screenshot_path=png, exit_when_done=True, workdir=tmp_path / "work",
    )
    assert summary["events_replayed"] == 3000
    assert summary["events_applied"] == 3000 and summary["events_observed_by_devices"] == 3000
    assert summary["updates_sent"] > 0 and summary["updates_applied"] == summary["updates_sent"]
    assert summary["dead_letters"] == 0 and summary["model_version"] >= 1
    assert 0 < summary["prequential_hr@10"] <= 1
    assert chart_pixels(png, LINE_BLUE) > 1500 and chart_pixels(png, LINE_ORANGE) > 100
