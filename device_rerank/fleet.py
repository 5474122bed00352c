"""Many simulated devices driven by a replayed log.

Each user's events go to that user's ``Device`` (created on first sight).
Devices fetch candidates on a realistic schedule - at session start (gap >
``session_gap_ms``), every ``refresh_ms``, or when the cached list is nearly
exhausted - and react to every other event locally. Upload opportunities come
in sweeps every ``sweep_ms`` of log time: a device uploads when its
connectivity window is open, it has new events since its last upload, and the
policy agrees. Traffic both ways and rerank latency samples are counted.

Per-event work is a dict lookup plus ``Device.observe`` (a forward pass only
on triggers), so ~100k events over ~2,000 devices run in a few CPU minutes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from streams.candidates import Candidates, quantize_rows, top_indices
from device_rerank.config import DeviceConfig
from device_rerank.device import CandidateSource, Device
from device_rerank.envelope import Keyring
from device_rerank.policy import AlwaysUpload, ConnectivityWindow, UploadPolicy
from device_rerank.reranker import Reranker
from streams.batch import EventBatch
from streams.datasets.base import EventLog
from streams.schema import EventKind

logger = logging.getLogger(__name__)

__all__ = ["CandidateSource", "Fleet", "FleetConfig", "FleetReport", "VectorCandidateSource"]


class VectorCandidateSource:
    """A stand-in for the cloud in simulations and tests: top-k by dot product with a user vector.

    Users without a vector get the ``fallback`` list (random items, flagged "popular").
    Counts its calls so tests can assert none happened while reranking.

    Args:
        item_ids: raw item ids.
        item_vectors: (n, d) float32 item embeddings (sent int8-quantized).
        user_vectors: raw user id -> (d,) vector; missing users get a random list.
        noise: std of Gaussian noise added to scores (an imperfect cloud).
        model_version: stamped on every list.
        seed: rng seed.
    """

    def __init__(
        self,
        item_ids: np.ndarray,
        item_vectors: np.ndarray,
        user_vectors: dict[int, np.ndarray] | None = None,
        noise: float = 0.0,
        model_version: int = 1,
        seed: int = 0,
    ) -> None:
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.emb_q, self.emb_scale = quantize_rows(self.item_vectors)
        self.user_vectors = user_vectors or {}
        self.noise = noise
        self.model_version = model_version
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def candidates(self, user_id: int, k: int = 100, at_ms: int | None = None) -> Candidates:
        self.calls += 1
        k = min(k, len(self.item_ids))
        u = self.user_vectors.get(int(user_id))
        fallback = None
        if u is None:
            scores = self.rng.random(len(self.item_ids)).astype(np.float32)
            fallback = "popular"
        else:
            scores = self.item_vectors @ u
            if self.noise:
                scores = scores + self.rng.normal(0, self.noise, size=len(scores))
        top = top_indices(scores, k)
        return Candidates(
            user_id=int(user_id),
            item_ids=self.item_ids[top],
            scores=scores[top].astype(np.float32),
            emb_q=self.emb_q[top],
            emb_scale=self.emb_scale[top],
            model_version=self.model_version,
            computed_at_ms=int(at_ms or 0),
            fallback=fallback,
        )


@dataclass(frozen=True)
class FleetConfig:
    """Fleet simulation settings.

    Args:
        device: config every device gets.
        k: candidates per fetch.
        session_gap_ms: a gap longer than this starts a session (fetch).
        refresh_ms: fetch at least this often while active.
        min_remaining: fetch when fewer unseen cached candidates remain.
        families: update families each device sends at an upload opportunity.
        sweep_ms: log time between upload opportunities.
        personalize_steps: patch steps per device per open-window sweep (0 = off).
        latency_sample_every: time one in this many re-scores.
        batch_size: events per batch when replaying an ``EventLog``.
    """

    device: DeviceConfig = field(default_factory=DeviceConfig)
    k: int = 100
    session_gap_ms: int = 30 * 60_000
    refresh_ms: int = 60 * 60_000
    min_remaining: int = 10
    families: tuple[str, ...] = ("feature",)
    sweep_ms: int = 60 * 60_000
    personalize_steps: int = 0
    latency_sample_every: int = 10
    batch_size: int = 4096


@dataclass
class FleetReport:
    """Counters of one ``Fleet.run``."""

    events: int = 0
    devices: int = 0
    fetches: int = 0
    bytes_down: int = 0
    uploads: Counter = field(default_factory=Counter)
    bytes_up: Counter = field(default_factory=Counter)
    refused: int = 0
    rescores: int = 0
    latency_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def latency_percentiles(self) -> dict[str, float]:
        if not self.latency_ms:
            return {"p50": float("nan"), "p99": float("nan")}
        a = np.asarray(self.latency_ms)
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}

    def summary(self) -> dict:
        return {
            "events": self.events,
            "devices": self.devices,
            "fetches": self.fetches,
            "bytes_down": self.bytes_down,
            "uploads": dict(self.uploads),
            "bytes_up": dict(self.bytes_up),
            "refused": self.refused,
            "rescores": self.rescores,
            "rerank_ms": self.latency_percentiles(),
            "wall_s": round(self.wall_s, 2),
        }


class Fleet:
    """Routes a replayed log to per-user devices and simulates their traffic.

    Args:
        model: shared reranker (all devices reference it; only patches differ).
        source: candidate source (a client of the cloud's candidate HTTP API, or a fake).
        keyring: derives each device's signing key.
        config: schedule and sizes.
        policy: upload-trigger policy.
        window: connectivity windows.
        sink: receives every envelope's bytes (e.g. a producer to "device-updates").
        configure: called once per new device (a Strategy's ``configure_device``).
        model_version: shared-model version devices start with.
    """

    def __init__(
        self,
        model: Reranker,
        source: CandidateSource,
        keyring: Keyring,
        config: FleetConfig | None = None,
        policy: UploadPolicy | None = None,
        window: ConnectivityWindow | None = None,
        sink: Callable[[bytes], None] | None = None,
        configure: Callable[[Device], None] | None = None,
        model_version: int = 0,
    ) -> None:
        self.model = model
        self.source = source
        self.keyring = keyring
        self.config = config or FleetConfig()
        self.policy = policy or AlwaysUpload()
        self.window = window or ConnectivityWindow(mode="always")
        self.sink = sink
        self.configure = configure
        self.model_version = model_version
        self.devices: dict[int, Device] = {}
        self.live: set[int] | None = None
        self.report = FleetReport()
        self._last_fetch: dict[int, int] = {}
        self._last_upload_event: dict[int, int] = {}
        self._events_seen: Counter = Counter()
        self._next_sweep: int | None = None
        self._rescore_count = 0

    def device(self, user_id: int) -> Device:
        dev = self.devices.get(user_id)
        if dev is None:
            dev = Device(user_id, self.model, self.config.device, key=self.keyring.key_for(user_id), model_version=self.model_version)
            if self.configure is not None:
                self.configure(dev)
            self.devices[user_id] = dev
        return dev

    def broadcast(self, model: Reranker, model_version: int) -> None:
        """A refreshed shared model reaches every device."""
        self.model, self.model_version = model, model_version
        for dev in self.devices.values():
            dev.set_model(model, model_version)

    def _fetch(self, dev: Device, ts: int) -> None:
        self.report.bytes_down += dev.fetch(self.source, self.config.k, ts)
        self.report.fetches += 1
        self._last_fetch[dev.device_id] = ts

    def _needs_fetch(self, dev: Device, ts: int) -> bool:
        cfg = self.config
        if dev.cands is None:
            return True
        if ts - dev.last_event_ms > cfg.session_gap_ms:
            return True
        if ts - self._last_fetch.get(dev.device_id, -(1 << 62)) >= cfg.refresh_ms:
            return True
        return dev.remaining() < cfg.min_remaining

    def process(self, batch: EventBatch) -> None:
        """Feed one batch of events (time-ordered) to the devices."""
        cfg = self.config
        rep = self.report
        ts_a, user_a, item_a = batch.ts_ms.tolist(), batch.user_id.tolist(), batch.item_id.tolist()
        val_a, kind_a = batch.value.tolist(), batch.kind.tolist()
        live_code, off_code = int(EventKind.STREAM_LIVE), int(EventKind.STREAM_OFFLINE)
        for ts, user, item, value, kind in zip(ts_a, user_a, item_a, val_a, kind_a):
            if self._next_sweep is None:
                self._next_sweep = (ts // cfg.sweep_ms + 1) * cfg.sweep_ms
            while ts >= self._next_sweep:
                self.sweep(self._next_sweep)
                self._next_sweep += cfg.sweep_ms
            rep.events += 1
            if kind == live_code or kind == off_code:
                if self.live is None:
                    self.live = set()
                (self.live.add if kind == live_code else self.live.discard)(item)
                continue
            if user < 0:
                continue
            dev = self.device(user)
            if self._needs_fetch(dev, ts):
                self._fetch(dev, ts)
            self._events_seen[user] += 1
            if self.live is not None:
                dev.set_live(self.live)  # shared view of availability (read-only on devices)
            sample = self._rescore_count % cfg.latency_sample_every == 0
            t0 = time.perf_counter() if sample else 0.0
            if dev.observe(ts, item, kind, value):
                dev.ranking(ts)  # the user looks at the re-scored list
                self._rescore_count += 1
                if sample:
                    rep.latency_ms.append((time.perf_counter() - t0) * 1e3)

    def sweep(self, now_ms: int) -> None:
        """One upload opportunity for every device with new events and an open window."""
        cfg = self.config
        rep = self.report
        for dev_id, dev in self.devices.items():
            seen = self._events_seen[dev_id]
            if seen == self._last_upload_event.get(dev_id, 0) or not self.window.is_open(dev_id, now_ms):
                continue
            if cfg.personalize_steps:
                dev.personalize(cfg.personalize_steps)
            interest = dev.interest(now_ms)
            if not self.policy.should_upload(dev_id, now_ms, interest):
                continue
            sent = False
            for fam in cfg.families:
                env = dev.make_update(fam, now_ms)
                if env is None:
                    rep.refused += 1
                    continue
                raw = env.encode()
                rep.uploads[fam] += 1
                rep.bytes_up[fam] += len(raw)
                if self.sink is not None:
                    self.sink(raw)
                sent = True
            if sent:
                self.policy.mark_sent(dev_id, now_ms, interest)
                self._last_upload_event[dev_id] = seen

    def run(self, data: EventLog | Iterable[EventBatch], final_sweep: bool = True) -> FleetReport:
        """Replay a log (or a stream of batches) through the fleet; returns the report."""
        t0 = time.perf_counter()
        batches = data.batches(self.config.batch_size) if isinstance(data, EventLog) else data
        last_ts = None
        for batch in batches:
            if len(batch):
                self.process(batch)
                last_ts = int(batch.ts_ms[-1])
        if final_sweep and last_ts is not None:
            self.sweep(last_ts)
        self.report.devices = len(self.devices)
        self.report.rescores = sum(d.rescores for d in self.devices.values())
        self.report.wall_s += time.perf_counter() - t0
        logger.info("fleet run: %s", self.report.summary())
        return self.report
