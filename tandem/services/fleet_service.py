"""The device-fleet service: the evaluation's fleet (``StrategyFleet``), driven by ``interactions``.

Each worker is a member of consumer group ``fleet``; the broker gives each replica a
disjoint set of partitions, hence of users (events are keyed by user). For each polled
record the worker does what ``tandem evaluate`` does for a mini-batch:

1. asks the fetch schedule (``tandem.strategies.schedule``) which actions come with a fetch
   or a sync, and fetches every such list in one ``POST /candidates:batch``, each request
   carrying the device's recent items as of its own action;
2. per action: the device receives its list (at a sync it also takes the newest shared
   reranker, personalizes and may upload), ranks (what the user sees: scored against the
   action, the fleet-side prequential NDCG@10), observes the action, may upload;
3. sends the uploads to ``device-updates`` (key = device id), flushes, commits.

Refreshed rerankers arrive on ``model-refresh``. Offsets are committed after the poll's
updates are flushed (at-least-once). Device sequence numbers start at a time-based base
so a restarted worker never reuses a seq the cloud has accepted; a re-delivered envelope is
byte-identical and deduplicated by the cloud.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

import httpx
import numpy as np

from cloud_recsys.availability import Availability
from streams.candidates import Candidates, candidates_from_json
from streams.batch import EventBatch, decode_valid
from streams.schema import AVAILABILITY_KINDS, POSITIVE_KINDS, SchemaError
from streams.transport import Consumer, Transport
from tandem.services.metrics import Registry, add_metrics_routes
from tandem.services.settings import TOPIC_AVAILABILITY, TOPIC_INTERACTIONS, TOPIC_REFRESH, TOPIC_UPDATES, FleetSettings

log = logging.getLogger(__name__)

_AVAIL = np.array(sorted(int(k) for k in AVAILABILITY_KINDS), dtype=np.uint8)
_POS = frozenset(int(k) for k in POSITIVE_KINDS)


class CandidateClient:
    """The cloud candidate API over HTTP (a ``device_rerank.device.CandidateSource``).

    Args:
        base_url: e.g. ``http://cloud:8000``.
        timeout_s: per-request timeout.
        registry: records fetch latency and bytes.
    """

    def __init__(self, base_url: str, timeout_s: float = 5.0, registry: Registry | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s)
        self.metrics = registry

    def candidates(self, user_id: int, k: int = 100, at_ms: int | None = None) -> Candidates:
        return self.fetch([{"user_id": int(user_id), **({"at_ms": int(at_ms)} if at_ms is not None else {})}], k)[0]

    def fetch(self, requests: list[dict[str, Any]], k: int) -> list[Candidates]:
        """One ``POST /candidates:batch``: each request is ``{"user_id", "at_ms", "session": {"item_ids", "ts_ms"}, "exclude"}``."""
        t0 = time.perf_counter()
        resp = self.http.post(f"{self.base_url}/candidates:batch", json={"requests": requests, "k": int(k)})
        resp.raise_for_status()
        data = resp.json()
        if self.metrics:
            self.metrics.observe("candidate_fetch_seconds", time.perf_counter() - t0)
            self.metrics.inc("candidate_bytes", len(resp.content))
        return [candidates_from_json(c) for c in data["results"]]

    def close(self) -> None:
        self.http.close()


class EngineClient:
    """The candidate API of an engine in the same process (tests and the equivalence check:
    the fleet's HTTP client minus the HTTP)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def fetch(self, requests: list[dict[str, Any]], k: int) -> list[Candidates]:
        from tandem.services.candidate_api import RequestBody

        if hasattr(self.engine, "requests"):  # the recommender engine: sessions travel with the fetch
            return self.engine.candidates([RequestBody(**r) for r in requests], k, None)
        return [self.engine.candidates(int(r["user_id"]), k, int(r.get("at_ms", 0))) for r in requests]


class FleetWorker:
    """The devices of this worker's partitions, run by ``StrategyFleet``.

    Args:
        settings: fleet settings (``strategy`` names what devices run and send).
        transport: topics.
        client: candidate source with ``fetch(requests, k)`` (``CandidateClient`` on the cloud URL by default).
        registry: metrics (``update_bytes``, ``rerank_latency_seconds``, ``device_ndcg``, ...).
    """

    def __init__(self, settings: FleetSettings, transport: Transport, client: Any | None = None, registry: Registry | None = None) -> None:
        import os

        import torch

        from device_rerank.config import DeviceConfig, RerankerConfig
        from device_rerank.envelope import Keyring
        from device_rerank.reranker import Reranker
        from tandem.services.devices import master_key
        from tandem.strategies import make_strategies
        from tandem.strategies.fleet import StrategyFleet
        from tandem.strategies.schedule import ScheduleConfig, SyncSchedule

        # Devices are tiny models: one thread each is fastest (2 threads on a shared 2-core box
        # made one rerank ~30x slower here).
        torch.set_num_threads(int(os.environ.get("TANDEM_TORCH_THREADS", "1")))
        self.settings = settings
        self.transport = transport
        self.metrics = registry or Registry("fleet")
        self.client = client or CandidateClient(settings.cloud_url, settings.http_timeout_s, self.metrics)
        self.keyring = Keyring(master_key(settings.device_key, settings.dev_mode or None))
        self.repeat = settings.domain == "repeat"
        self.strategy = make_strategies(settings.strategy)[0]
        model = Reranker(RerankerConfig(emb_dim=settings.embedding_dim))
        model.eval()
        base = DeviceConfig(exclude_consumed=not self.repeat, inject_live_recall=self.repeat)
        # A device's first seq is time-based: monotonic across worker restarts (replay protection).
        self.fleet = StrategyFleet(self.strategy, model, 0, base, self.keyring, settings.min_new_engagements, seq_start=lambda _u: time.time_ns() // 1000)
        self.schedule = SyncSchedule(ScheduleConfig(settings.session_gap_ms, settings.fetch_every_ms, settings.refetch_every))
        self.sessions: dict[int, deque[tuple[int, int]]] = {}  # what each device sends with a fetch
        self.consumed: dict[int, set[int]] = {}  # feeds: what each device never shows again
        self.last_positive: dict[int, tuple[int, int]] = {}
        self.cloud_version = 0
        self._reranker_version = -1  # the cloud's initial reranker (version 0) replaces the local one too
        self.consumer: Consumer | None = None
        self.refresh_consumer: Consumer | None = None
        self.availability_consumer: Consumer | None = None
        self.availability = Availability(max_transitions=32)  # what is live now: the devices' context
        self._live_cache: tuple[int, set[int] | None] = (-1, None)
        self._seen = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.events_observed = 0
        self.updates_sent = 0
        self.points = 0
        self.ndcg_sum = 0.0

    @property
    def devices(self) -> dict[int, Any]:
        return self.fleet.devices

    def open(self) -> "FleetWorker":
        from tandem.services.cloud_service import IdSet

        # bounded by the fleet's size: past the capacity the oldest ids become a watermark
        cap = 50 * self.settings.max_devices
        self._seen = IdSet(capacity=cap) if cap else IdSet()
        self.transport.create_topic(TOPIC_INTERACTIONS, 4)
        self.transport.create_topic(TOPIC_UPDATES, 4)
        self.transport.create_topic(TOPIC_REFRESH, 1)
        self.consumer = self.transport.consumer(TOPIC_INTERACTIONS, self.settings.group)
        # Every worker reads every refresh: a fixed assignment, never committed.
        self.refresh_consumer = self.transport.consumer(
            TOPIC_REFRESH, f"{self.settings.group}-refresh", partitions=list(range(self.transport.partitions(TOPIC_REFRESH)))
        )
        self.refresh_consumer.seek_to_beginning()
        # Every worker reads every transition too (devices know which streams are live).
        self.transport.create_topic(TOPIC_AVAILABILITY, 1)
        self.availability_consumer = self.transport.consumer(
            TOPIC_AVAILABILITY, f"{self.settings.group}-availability", partitions=list(range(self.transport.partitions(TOPIC_AVAILABILITY)))
        )
        self.availability_consumer.seek_to_beginning()
        return self

    def _poll_availability(self) -> None:
        """Apply every availability transition published so far (before the actions that follow it)."""
        assert self.availability_consumer is not None
        while recs := self.availability_consumer.poll(self.settings.poll_records, timeout_s=0.0):
            for rec in recs:
                try:
                    batch, _bad = decode_valid(rec.value)
                except SchemaError:
                    continue  # the cloud dead-letters it
                self.availability.apply(batch)

    def _live_at(self, ts_ms: int) -> set[int] | None:
        """Items live at ``ts_ms`` (None when the stream carries no availability: a feed)."""
        if not len(self.availability):
            return None
        if self._live_cache[0] != ts_ms:
            self._live_cache = (ts_ms, set(self.availability.live(ts_ms).tolist()))
        return self._live_cache[1]

    def _poll_refresh(self) -> None:
        """Take the newest shared reranker the cloud shipped (devices swap it in at their next sync)."""
        from tandem.services.recommender_engine import decode_reranker

        assert self.refresh_consumer is not None
        newest: dict[str, Any] | None = None
        trial: dict[str, Any] | None = None
        for rec in self.refresh_consumer.poll(100, timeout_s=0.0):
            try:
                msg = json.loads(rec.value)
                self.cloud_version = max(self.cloud_version, int(msg["model_version"]))
            except (ValueError, KeyError, TypeError):
                self.metrics.inc("refresh_messages_bad", help="unreadable model-refresh messages skipped")
                continue
            if "reranker" in msg and int(msg.get("reranker_version", -1)) > self._reranker_version:
                newest = msg
            if "trial_version" in msg:
                trial = msg  # the newest message says which trial (if any) devices score now
        if trial is not None:
            self._take_trial(trial, decode_reranker)
        if newest is not None:
            if newest.get("strategy") not in (None, self.strategy.name):
                log.warning("model-refresh comes from strategy %r, this fleet runs %r: reranker ignored", newest.get("strategy"), self.strategy.name)
            else:
                try:
                    model = decode_reranker(newest["reranker"], self.settings.embedding_dim)
                    self.fleet.set_model(model, int(newest["reranker_version"]))
                    self._reranker_version = int(newest["reranker_version"])
                    self.metrics.inc("rerankers_received", help="shared rerankers taken from model-refresh")
                except ValueError as exc:
                    self.metrics.inc("refresh_messages_bad")
                    log.warning("model-refresh reranker refused: %s", exc)
        self.metrics.set("cloud_model_version", self.cloud_version)

    def _take_trial(self, msg: dict[str, Any], decode: Any) -> None:
        """Set (or clear) the trial reranker the fleet's devices score at their syncs (the ship gate)."""
        try:
            version = int(msg.get("trial_version", -1))
            if msg.get("strategy") not in (None, self.strategy.name) or version == self.fleet.trial_version:
                return
            if version < 0 or "trial" not in msg:
                self.fleet.set_trial(None)
                return
            self.fleet.set_trial(decode(msg["trial"], self.settings.embedding_dim), version)
            self.metrics.inc("trials_received", help="trial rerankers taken from model-refresh")
        except (ValueError, TypeError) as exc:
            self.metrics.inc("refresh_messages_bad")
            log.warning("model-refresh trial refused: %s", exc)

    def _evict(self) -> None:
        while len(self.fleet.devices) > self.settings.max_devices:
            old = next(iter(self.fleet.devices))
            self.fleet.forget(old)
            self.schedule.forget(old)
            for d in (self.sessions, self.consumed, self.last_positive):
                d.pop(old, None)

    def _handle(self, batch: EventBatch) -> None:
        fresh = ~self._seen.contains(batch.event_id)
        user_rows = fresh & ~np.isin(batch.kind, _AVAIL) & (batch.user_id >= 0)
        self._seen.add(batch.event_id)
        idx = np.flatnonzero(user_rows)
        if len(idx) == 0:
            return
        users, ts, items, kinds, vals = (batch.user_id[idx].tolist(), batch.ts_ms[idx].tolist(), batch.item_id[idx].tolist(), batch.kind[idx].tolist(), batch.value[idx].tolist())
        gap = self.settings.session_gap_ms
        # pass 1: which actions fetch (each request carries the device's session as of its action)
        plan: list[tuple[bool, bool, bool]] = []  # (prediction point, fetch, sync)
        shown_filter: list[set[int] | None] = []  # rerank off, feeds: what the client drops (consumed before)
        client_filters = not self.repeat and not self.strategy.rerank
        requests: list[dict[str, Any]] = []
        for u, t, it, kd in zip(users, ts, items, kinds):
            positive = kd in _POS
            prev = self.last_positive.get(u)
            point = positive and not (prev is not None and prev[0] == it and t - prev[1] <= gap)
            fetch, sync = self.schedule.step(u, t, point)
            plan.append((point, fetch, sync))
            shown_filter.append(set(self.consumed.get(u, ())) if client_filters and point else None)
            if fetch:
                sess = self.sessions.get(u, ())
                req: dict[str, Any] = {"user_id": u, "at_ms": t, "session": {"item_ids": [i for i, _ in sess], "ts_ms": [x for _, x in sess]}}
                if not self.repeat and self.consumed.get(u):
                    req["exclude"] = sorted(self.consumed[u])
                requests.append(req)
            if positive:
                self.last_positive[u] = (it, t)
                d = self.sessions.get(u)
                if d is None:
                    d = self.sessions[u] = deque(maxlen=self.settings.session_len)
                d.append((it, t))
                if not self.repeat:
                    self.consumed.setdefault(u, set()).add(it)
        lists: list[Candidates] = []
        if requests:
            try:
                lists = self.client.fetch(requests, self.settings.k)
            except httpx.HTTPError as exc:
                self.metrics.inc("candidate_fetch_errors", help="candidate fetches that failed (devices keep their lists)")
                log.warning("candidate fetch failed (%s); devices keep their cached lists", exc)
            self.metrics.inc("fetches", len(lists), help="candidate lists fetched")
        # pass 2: receive, rank (scored), observe, upload - as the evaluation does per action
        li = 0
        for (point, fetch, sync), consumed, u, t, it, kd, val in zip(plan, shown_filter, users, ts, items, kinds, vals):
            if fetch and li < len(lists):
                self.fleet.receive(u, t, lists[li], sync, tag=u)
                li += 1
            if point:
                t0 = time.perf_counter()
                ranking = self.fleet.ranking(u, t, self._live_at(t), consumed)[:10]
                self.metrics.observe("rerank_latency_seconds", time.perf_counter() - t0, help="rank on device")
                hit = np.flatnonzero(ranking == it)
                self.points += 1
                self.ndcg_sum += 1.0 / float(np.log2(hit[0] + 2)) if len(hit) else 0.0
            self.fleet.observe(u, t, it, kd, val, point, tag=u)
            self.events_observed += 1
        for raw, user in self.fleet.take_outbox():
            self.transport.produce(TOPIC_UPDATES, raw, key=str(user).encode())
            self.updates_sent += 1
            self.metrics.inc("update_bytes", len(raw), help="bytes uploaded by devices")
            self.metrics.inc("updates_sent", help="update envelopes sent")
        self._evict()
        self.metrics.set("devices", len(self.fleet.devices), help="devices in memory")
        self.metrics.set("events_observed", self.events_observed, help="user actions observed by devices")
        if self.points:
            self.metrics.set("device_ndcg", self.ndcg_sum / self.points, help="prequential NDCG@10 of what devices show")

    def step(self, timeout_s: float = 0.2) -> int:
        """Poll once, process, flush updates, commit; returns records processed."""
        assert self.consumer is not None
        self._poll_refresh()
        self._poll_availability()
        recs = self.consumer.poll(self.settings.poll_records, timeout_s=timeout_s)
        for rec in recs:
            if self._stop.is_set():  # stop promptly; the uncommitted rest is re-read by the next worker
                return 0
            try:
                batch, _bad = decode_valid(rec.value)
            except SchemaError:
                continue  # the cloud dead-letters bad records; devices just skip them
            if len(batch):
                self._handle(batch)
        if recs:
            self.transport.flush()
            self.consumer.commit()
        return len(recs)

    def run(self, max_idle_s: float | None = None) -> None:
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.step():
                    idle_since = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                    break
        except BaseException as exc:
            self.error = exc
            log.exception("fleet worker failed")
            raise

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.transport.flush()
        for cons in (self.consumer, self.refresh_consumer, self.availability_consumer):
            if cons is not None:
                cons.close()
        if isinstance(self.client, CandidateClient):
            self.client.close()

    def health(self) -> dict[str, Any]:
        ok = self.error is None
        return {"status": "ok" if ok else "error", "strategy": self.strategy.name, "devices": len(self.fleet.devices), "events_observed": self.events_observed}


def serve(settings: FleetSettings, max_idle_s: float | None = None) -> None:
    """Run one fleet worker with its /healthz + /metrics API until SIGTERM/SIGINT."""
    from fastapi import FastAPI

    from tandem.services.runtime import open_transport, run_worker_with_http

    transport = open_transport(settings.transport)
    worker = FleetWorker(settings, transport).open()
    app = add_metrics_routes(FastAPI(title="tandem fleet"), worker.metrics, health=worker.health)
    try:
        run_worker_with_http(worker, app, settings.host, settings.port, max_idle_s)
    finally:
        transport.close()
