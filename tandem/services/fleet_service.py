"""The device-fleet service: simulated devices, one per user, driven by ``interactions``.

Each worker is a member of consumer group ``fleet``; the broker gives each replica a
disjoint set of partitions, hence of users (events are keyed by user). For every user
action a worker:

1. makes sure the user's device holds candidates from the current model version
   (``POST /candidates:batch`` on the cloud API; one call per poll for all stale devices);
2. ``observe``s the action on the device and re-ranks (latency measured);
3. every ``update_every`` actions, sends the device's signed update envelope to
   ``device-updates`` (key = device id).

Offsets are committed after the poll's updates are flushed (at-least-once). Device
sequence numbers start at a time-based base so a restarted worker never reuses a seq
the cloud has accepted (that would be rejected as "replayed"); a re-delivered envelope is
byte-identical and deduplicated by the cloud.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import httpx
import numpy as np

from cloud_recsys.candidates import Candidates
from cloud_recsys.http import candidates_from_json
from streams.batch import EventBatch, decode_valid
from streams.schema import AVAILABILITY_KINDS, SchemaError
from streams.transport import Consumer, Transport
from tandem.services.metrics import Registry, add_metrics_routes
from tandem.services.settings import TOPIC_INTERACTIONS, TOPIC_REFRESH, TOPIC_UPDATES, FleetSettings

log = logging.getLogger(__name__)

_AVAIL = np.array(sorted(int(k) for k in AVAILABILITY_KINDS), dtype=np.uint8)


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
        params: dict[str, Any] = {"user_id": int(user_id), "k": int(k)}
        if at_ms is not None:
            params["at_ms"] = int(at_ms)
        t0 = time.perf_counter()
        resp = self.http.get(f"{self.base_url}/candidates", params=params)
        resp.raise_for_status()
        if self.metrics:
            self.metrics.observe("candidate_fetch_seconds", time.perf_counter() - t0)
            self.metrics.inc("candidate_bytes", len(resp.content))
        return candidates_from_json(resp.json())

    def candidates_batch(self, user_ids: list[int], k: int, at_ms: int | None = None) -> list[Candidates]:
        body: dict[str, Any] = {"user_ids": [int(u) for u in user_ids], "k": int(k)}
        if at_ms is not None:
            body["at_ms"] = int(at_ms)
        t0 = time.perf_counter()
        resp = self.http.post(f"{self.base_url}/candidates:batch", json=body)
        resp.raise_for_status()
        data = resp.json()
        if self.metrics:
            self.metrics.observe("candidate_fetch_seconds", time.perf_counter() - t0)
            self.metrics.inc("candidate_bytes", len(resp.content))
        return [candidates_from_json(c) for c in data["results"]]  # both engines answer {"results": [...]}

    def close(self) -> None:
        self.http.close()


class FleetWorker:
    """Simulated devices for the users of this worker's partitions.

    Args:
        settings: fleet settings.
        transport: topics.
        client: candidate source (``CandidateClient`` on the cloud URL by default).
        registry: metrics (``update_bytes``, ``rerank_latency_seconds``, ...).
    """

    def __init__(self, settings: FleetSettings, transport: Transport, client: Any | None = None, registry: Registry | None = None) -> None:
        from device_rerank.config import DeviceConfig, RerankerConfig
        from device_rerank.envelope import Keyring
        from device_rerank.reranker import Reranker

        import os

        import torch

        from tandem.services.devices import master_key

        # Devices are tiny models: one thread each is fastest (2 threads on a shared 2-core box
        # made one rerank ~30x slower here).
        torch.set_num_threads(int(os.environ.get("TANDEM_TORCH_THREADS", "1")))
        self.settings = settings
        self.transport = transport
        self.metrics = registry or Registry("fleet")
        self.client = client or CandidateClient(settings.cloud_url, settings.http_timeout_s, self.metrics)
        self.keyring = Keyring(master_key(settings.device_key))
        self.device_config = DeviceConfig()
        self.model = Reranker(RerankerConfig())
        self.model.eval()
        self.devices: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.observed: dict[int, int] = {}
        self.cloud_version = 0
        self.consumer: Consumer | None = None
        self.refresh_consumer: Consumer | None = None
        self._seen = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.events_observed = 0
        self.updates_sent = 0

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
        return self

    def _device(self, user_id: int) -> Any:
        from device_rerank.device import Device

        dev = self.devices.get(user_id)
        if dev is not None:
            self.devices.move_to_end(user_id)
            return dev
        dev = Device(user_id, self.model, self.device_config, key=self.keyring.key_for(user_id))
        dev.seq = time.time_ns() // 1000  # monotonic across worker restarts (replay protection)
        self.devices[user_id] = dev
        self.observed[user_id] = 0
        while len(self.devices) > self.settings.max_devices:
            old, _ = self.devices.popitem(last=False)
            self.observed.pop(old, None)
        self.metrics.set("devices", len(self.devices), help="devices in memory")
        return dev

    def _poll_refresh(self) -> None:
        assert self.refresh_consumer is not None
        import json

        for rec in self.refresh_consumer.poll(100, timeout_s=0.0):
            try:
                self.cloud_version = max(self.cloud_version, int(json.loads(rec.value)["model_version"]))
            except (ValueError, KeyError, TypeError):
                continue
        self.metrics.set("cloud_model_version", self.cloud_version)

    def _stale(self, dev: Any) -> bool:
        """A device refetches when it has no (or an empty) list or the cloud has refreshed since."""
        return dev.cands is None or len(dev.cands) == 0 or dev.model_version < self.cloud_version

    def _refresh_devices(self, users: np.ndarray, at_ms: int) -> None:
        stale = [int(u) for u in users if self._stale(self._device(int(u)))]
        if not stale:
            return
        try:
            if hasattr(self.client, "candidates_batch"):
                lists = self.client.candidates_batch(stale, self.settings.k, at_ms)
            else:
                lists = [self.client.candidates(u, self.settings.k, at_ms) for u in stale]
        except httpx.HTTPError as exc:
            self.metrics.inc("candidate_fetch_errors")
            log.warning("candidate fetch failed (%s); devices keep their cached lists", exc)
            return
        for user, cands in zip(stale, lists):
            dev = self._device(user)
            dev.cloud_calls += 1
            dev.receive(cands, at_ms)
            self.metrics.inc("bytes_downloaded", cands.nbytes, help="candidate payload bytes sent to devices")

    def _handle(self, batch: EventBatch) -> None:
        fresh = ~self._seen.contains(batch.event_id)
        user_rows = fresh & ~np.isin(batch.kind, _AVAIL) & (batch.user_id >= 0)
        self._seen.add(batch.event_id)
        idx = np.flatnonzero(user_rows)
        if len(idx) == 0:
            return
        self._refresh_devices(np.unique(batch.user_id[idx]), int(batch.ts_ms[idx[0]]))
        produced = 0
        for i in idx.tolist():
            user = int(batch.user_id[i])
            ts = int(batch.ts_ms[i])
            dev = self._device(user)
            t0 = time.perf_counter()
            dev.observe(ts, int(batch.item_id[i]), int(batch.kind[i]), float(batch.value[i]))
            dev.ranking(ts)
            self.metrics.observe("rerank_latency_seconds", time.perf_counter() - t0, help="observe + rerank on device")
            self.events_observed += 1
            self.observed[user] = self.observed.get(user, 0) + 1
            if self.observed[user] % self.settings.update_every == 0:
                env = dev.make_update(self.settings.family, ts)
                if env is None:
                    continue
                raw = env.encode()
                self.transport.produce(TOPIC_UPDATES, raw, key=str(user).encode())
                produced += 1
                self.updates_sent += 1
                self.metrics.inc("update_bytes", len(raw), help="bytes uploaded by devices")
                self.metrics.inc("updates_sent", help="update envelopes sent")
        self.metrics.set("events_observed", self.events_observed, help="user actions observed by devices")

    def step(self, timeout_s: float = 0.2) -> int:
        """Poll once, process, flush updates, commit; returns records processed."""
        assert self.consumer is not None
        self._poll_refresh()
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
        for cons in (self.consumer, self.refresh_consumer):
            if cons is not None:
                cons.close()
        if isinstance(self.client, CandidateClient):
            self.client.close()

    def health(self) -> dict[str, Any]:
        ok = self.error is None
        return {"status": "ok" if ok else "error", "devices": len(self.devices), "events_observed": self.events_observed}


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
