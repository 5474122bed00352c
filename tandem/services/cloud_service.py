"""The cloud service: consume topics, train online, aggregate device updates, serve candidates.

Delivery guarantees (docs/services.md):

* at-least-once: records are processed, then their offsets committed; after a crash the
  worker resumes from its last checkpoint, whose offsets were saved together with the model;
* idempotent effects: event ids and update ids already applied are skipped (the seen sets
  live in the checkpoint with the model and the offsets);
* dead letters: a record or row that fails validation, and an update that fails
  verification or is oversized, goes to ``<topic>.dlq`` with the reason. Dead letters are
  keyed by (topic, partition, offset, row) and the worker re-reads its DLQs on start, so a
  reprocessed bad input is never dead-lettered twice;
* back-pressure: one bounded poll at a time (``poll_records``), and device updates are
  buffered up to ``max_pending_updates`` before the updates consumer stops polling.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from streams.batch import EventBatch, decode_record, encode_batch
from streams.delivery import DeadLetterRecord, decode_dead_letter, encode_dead_letter
from streams.schema import AVAILABILITY_KINDS, POSITIVE_KINDS, SchemaError
from streams.transport import Consumer, Record, Transport, TransportError
from tandem.services.metrics import Registry
from tandem.services.settings import (
    TOPIC_AVAILABILITY,
    TOPIC_INTERACTIONS,
    TOPIC_REFRESH,
    TOPIC_UPDATES,
    CloudSettings,
    dlq_topic,
)

log = logging.getLogger(__name__)

_AVAIL = np.array(sorted(int(k) for k in AVAILABILITY_KINDS), dtype=np.uint8)
_POS = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)


class Rejected(Exception):
    """An input refused by the engine; ``reason`` goes to the dead-letter record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Engine(Protocol):
    """What the cloud worker needs from the model side (see engines.py)."""

    version: int

    def train(self, batch: EventBatch) -> None: ...
    def apply_availability(self, batch: EventBatch) -> None: ...
    def apply_updates(self, updates: list[Any]) -> None: ...
    def refresh(self) -> int: ...
    def topk(self, user_id: int, k: int, at_ms: int) -> np.ndarray: ...
    def save(self, path: Path) -> None: ...
    def load(self, path: Path) -> None: ...
    def http_app(self) -> Any: ...


def dead_letter(reason: str, rec: Record, payload: bytes | None = None, row: int | None = None) -> bytes:
    """A DLQ record (``streams.delivery.DeadLetterRecord``): reason, origin and the payload in base64."""
    return encode_dead_letter(
        DeadLetterRecord(
            reason=reason, topic=rec.topic, partition=int(rec.partition), offset=int(rec.offset), row=None if row is None else int(row),
            payload_b64=base64.b64encode(rec.value if payload is None else payload).decode(),
        )
    )


def reason_key(topic: str, reason: str) -> str:
    """A bounded label for a dead-letter reason: ``"<topic>: <reason before ':'>"``, digits as ``N``.

    Why: reasons carry values ("batch of 5000 events exceeds ..."); a metric label must not.
    """
    head = re.sub(r"\d+", "N", reason.split(":", 1)[0]).strip()
    return f"{topic}: {head[:60]}"


def read_to_end(transport: Transport, topic: str, group: str, tail: int | None = None, timeout_s: float = 30.0) -> Iterator[Record]:
    """Every record of ``topic`` (or the last ``tail`` of each partition) up to its current end.

    A fixed assignment (no group join); the end is re-read whenever a poll comes back empty,
    since a fresh consumer's ``end_offsets()`` can fall short on some brokers.
    """
    cons = transport.consumer(topic, group, partitions=list(range(transport.partitions(topic))))
    try:
        if tail is None:
            cons.seek_to_beginning()
        else:
            for part, end in cons.end_offsets().items():
                cons.seek(part, max(0, end - tail))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recs = cons.poll(1000, timeout_s=0.5)
            if not recs:
                ends, pos = cons.end_offsets(), cons.positions()
                if all(pos.get(p, 0) >= e for p, e in ends.items()):
                    break
            yield from recs
    finally:
        cons.close()


def dlq_key(rec: Record, row: int | None) -> tuple[str, int, int, int]:
    return (rec.topic, rec.partition, rec.offset, -1 if row is None else row)


class IdSet:
    """A bounded set of uint64 ids for deduplication (8 bytes per id, vectorized lookups).

    Three levels keep both lookups and inserts cheap: a large sorted array, a small sorted
    array (merged into the large one every ``merge_every`` ids) and a few recent batches.
    At most ``capacity`` ids are kept: beyond it the smallest are dropped and become a
    watermark, and ids below the watermark count as seen. Event ids grow with log time,
    so this forgets only events far older than any redelivery.
    """

    def __init__(self, ids: np.ndarray | None = None, merge_every: int = 65_536, capacity: int = 4_000_000, floor: int = 0) -> None:
        self._main = np.unique(np.asarray(ids, dtype=np.uint64)) if ids is not None else np.empty(0, np.uint64)
        self._mid = np.empty(0, np.uint64)
        self._recent: list[np.ndarray] = []
        self.merge_every = merge_every
        self.capacity = capacity
        self.floor = floor  # ids below this count as seen
        self._trim()

    def __len__(self) -> int:
        return len(self.to_array())

    def _merge_recent(self) -> None:
        if self._recent:
            self._mid = self._union(self._mid, np.unique(np.concatenate(self._recent)))
            self._recent = []
        if len(self._mid) >= self.merge_every:
            self._main = self._union(self._main, self._mid)
            self._mid = np.empty(0, np.uint64)
            self._trim()

    @staticmethod
    def _union(main: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Sorted union of two sorted unique arrays, in linear time.

        Why not ``np.union1d``: it re-sorts (hash-uniques) the whole set at every merge, so
        the cost of a merge grew with everything ever applied and sustained ingest fell from
        ~50k to ~11k events/s within 2M events (bench_load; ids from several partitions
        interleave, so the append-only case rarely applies). A stable sort of two sorted runs
        is a merge (timsort), then one pass drops the duplicates.
        """
        if len(main) == 0:
            return new
        if len(new) == 0:
            return main
        if new[0] > main[-1]:
            return np.concatenate([main, new])
        merged = np.concatenate([main, new])
        merged.sort(kind="stable")
        keep = np.empty(len(merged), dtype=bool)
        keep[0] = True
        np.not_equal(merged[1:], merged[:-1], out=keep[1:])
        return merged[keep]

    def _trim(self) -> None:
        if len(self._main) > self.capacity:
            cut = len(self._main) - self.capacity
            self.floor = max(self.floor, int(self._main[cut]))
            self._main = self._main[cut:]

    @staticmethod
    def _in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if len(sorted_ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.searchsorted(sorted_ids, ids)
        pos[pos >= len(sorted_ids)] = 0
        return sorted_ids[pos] == ids

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the set (or below the watermark)."""
        ids = np.asarray(ids, dtype=np.uint64)
        out = self._in_sorted(self._main, ids) | self._in_sorted(self._mid, ids)
        if self.floor:
            out |= ids < np.uint64(self.floor)
        for batch in self._recent:
            out |= np.isin(ids, batch)
        return out

    def add(self, ids: np.ndarray) -> None:
        self._recent.append(np.asarray(ids, dtype=np.uint64).copy())
        if len(self._recent) >= 8:
            self._merge_recent()

    def to_array(self) -> np.ndarray:
        """All kept ids, sorted (merges everything first)."""
        self._merge_recent()
        if len(self._mid):
            self._main = self._union(self._main, self._mid)
            self._mid = np.empty(0, np.uint64)
            self._trim()
        return self._main


@dataclass
class DeliveryState:
    """Everything checkpointed with the model so that effects stay exactly-once.

    Args:
        offsets: ``{topic: {partition: next offset}}`` covered by the model state.
        seen_events: event ids applied (dedup).
        gate: the update gate's state (per-device sequence numbers and recent envelope
            digests: replay protection and redelivery dedup, bounded by active devices).
        events_applied / event_id_sum: audit figures (sum detects double application).
    """

    offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    seen_events: IdSet = field(default_factory=IdSet)
    gate: dict[str, Any] = field(default_factory=dict)
    events_applied: int = 0
    event_id_sum: int = 0
    updates_applied: int = 0
    availability_applied: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    evaluated: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "offsets": {t: {str(p): o for p, o in po.items()} for t, po in self.offsets.items()},
            "seen_events": base64.b64encode(self.seen_events.to_array().tobytes()).decode(),
            "seen_floor": self.seen_events.floor,
            "events_applied": self.events_applied,
            "event_id_sum": self.event_id_sum,
            "updates_applied": self.updates_applied,
            "availability_applied": self.availability_applied,
            "hits": self.hits,
            "ndcg": self.ndcg,
            "evaluated": self.evaluated,
            "gate": self.gate,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DeliveryState":
        seen = np.frombuffer(base64.b64decode(data["seen_events"]), dtype=np.uint64)
        return cls(
            offsets={t: {int(p): int(o) for p, o in po.items()} for t, po in data["offsets"].items()},
            seen_events=IdSet(seen, floor=int(data.get("seen_floor", 0))),
            events_applied=int(data["events_applied"]),
            event_id_sum=int(data["event_id_sum"]),
            updates_applied=int(data["updates_applied"]),
            availability_applied=int(data.get("availability_applied", 0)),
            hits=float(data.get("hits", 0.0)),
            ndcg=float(data.get("ndcg", 0.0)),
            evaluated=int(data.get("evaluated", 0)),
            gate=dict(data.get("gate", {})),
        )


class CloudWorker:
    """Consumes ``interactions``, ``availability`` and ``device-updates`` and drives the engine.

    Args:
        settings: service settings (topics, checkpoint schedule, bounds).
        transport: where the topics live.
        engine: the model side (two-tower or popularity).
        registry: metrics of this service.
        gate: update verifier (default: ``devices.UpdateGate`` keyed by ``settings.device_key``).
    """

    TOPICS = (TOPIC_INTERACTIONS, TOPIC_AVAILABILITY, TOPIC_UPDATES)

    def __init__(
        self,
        settings: CloudSettings,
        transport: Transport,
        engine: Engine,
        registry: Registry | None = None,
        gate: Any | None = None,
    ) -> None:
        from tandem.services.devices import UpdateGate

        self.settings = settings
        contract = getattr(engine, "update_contract", None)  # the strategy's own: widths, bounds, caps
        self.gate = gate or UpdateGate(
            settings.device_key,
            max_staleness_versions=settings.max_staleness_versions,
            previous_keys=settings.device_key_previous or None,
            dev_mode=settings.dev_mode or None,
            **(contract() if contract is not None else {}),
        )
        self.transport = transport
        self.engine = engine
        self.metrics = registry or Registry("cloud")
        self.state = DeliveryState()
        self.consumers: dict[str, Consumer] = {}
        self.pending_updates: dict[str, tuple[Any, Record]] = {}  # update id -> (verified update, its record), in arrival order
        self._dead: set[tuple[str, int, int, int]] = set()
        self._since_refresh = 0
        self._since_ckpt = 0
        self._pending_since = time.monotonic()
        self._last_ckpt = time.monotonic()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    # -- setup --------------------------------------------------------------
    def ensure_topics(self) -> None:
        """Create the topics this service uses (idempotent)."""
        for topic in (TOPIC_INTERACTIONS, TOPIC_AVAILABILITY, TOPIC_UPDATES):
            self.transport.create_topic(topic, self.settings.partitions)
            self.transport.create_topic(dlq_topic(topic), 1)
        self.transport.create_topic(TOPIC_REFRESH, 1)

    def open(self) -> "CloudWorker":
        """Create topics, restore the checkpoint, open consumers at the right offsets."""
        self.ensure_topics()
        self._load_dead_letters()
        restored = self.restore()
        self._prune_dead()
        for topic in self.TOPICS:
            # One cloud instance owns every partition: a fixed assignment, no group rebalances.
            parts = list(range(self.transport.partitions(topic)))
            cons = self.transport.consumer(topic, self.settings.group, partitions=parts)
            if restored:
                self._seek_to_state(topic, cons, parts)
            self.consumers[topic] = cons
        announced = self._last_announced_version()
        if announced > self.engine.version:
            # A refresh announced before a crash outlived the checkpoint: never reuse a version
            # number (devices hold it and stamp their updates with it).
            log.info("resuming versions after %d (the checkpoint holds %d)", announced, self.engine.version)
            self.engine.resume_versions_after(announced)
        self.gate.set_model_version(self.engine.version)
        if hasattr(self.engine, "refresh_payload"):
            self._announce(self.engine.version)  # a fleet starting now gets the current shared reranker
        self._publish_gauges()
        log.info("cloud worker open (restored=%s, events_applied=%d)", restored, self.state.events_applied)
        return self

    def _last_announced_version(self, tail: int = 16) -> int:
        """The newest ``model_version`` on ``model-refresh`` (0 when none), from the topic's tail."""
        newest = 0
        for rec in read_to_end(self.transport, TOPIC_REFRESH, f"{self.settings.group}-refresh-scan", tail=tail):
            try:
                newest = max(newest, int(json.loads(rec.value)["model_version"]))
            except (ValueError, KeyError, TypeError):
                continue
        return newest

    def _load_dead_letters(self) -> None:
        """Re-read the DLQs so reprocessing after a crash never dead-letters an input twice."""
        for topic in self.TOPICS:
            for r in read_to_end(self.transport, dlq_topic(topic), f"{self.settings.group}-dlq-scan"):
                try:
                    d = decode_dead_letter(r.value)
                except SchemaError:
                    continue
                self._dead.add((d.topic, d.partition, d.offset, -1 if d.row is None else d.row))
        if self._dead:
            log.info("found %d dead letters from earlier runs", len(self._dead))

    # -- checkpoints ----------------------------------------------------------
    def _ckpt_root(self) -> Path | None:
        return Path(self.settings.checkpoint_dir) if self.settings.checkpoint_dir else None

    def checkpoint(self) -> Path | None:
        """Save model + delivery state + offsets atomically (new dir, then LATEST pointer)."""
        root = self._ckpt_root()
        if root is None:
            return None
        with self.lock:
            self._flush_updates()
            self.transport.flush()  # dead letters and refreshes are acknowledged before offsets move
            root.mkdir(parents=True, exist_ok=True)
            name = f"ckpt-{time.time_ns()}"
            tmp = root / f".{name}.tmp"
            tmp.mkdir()
            self.engine.save(tmp / "model")
            self.state.gate = self.gate.state()
            (tmp / "delivery.json").write_text(json.dumps(self.state.to_json()))
            os.replace(tmp, root / name)
            latest_tmp = root / ".LATEST.tmp"
            latest_tmp.write_text(name)
            os.replace(latest_tmp, root / "LATEST")
            self._prune_dead()
            for old in sorted(p for p in root.glob("ckpt-*") if p.name != name)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        # The broker's committed offsets trail the checkpoint (informative: lag, monitoring).
        self._commit_offsets()
        self._since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self.metrics.inc("checkpoints", help="checkpoints written")
        log.info("checkpoint %s (events_applied=%d)", name, self.state.events_applied)
        return root / name

    def _prune_dead(self) -> None:
        """Forget dead-lettered positions the checkpoint has moved past (never reprocessed):
        the set stays bounded by what one checkpoint interval dead-letters."""
        offs = self.state.offsets
        self._dead = {k for k in self._dead if k[2] >= offs.get(k[0], {}).get(k[1], 0)}

    def restore(self) -> bool:
        """Load the latest checkpoint, if any; True when one was loaded."""
        root = self._ckpt_root()
        if root is None or not (root / "LATEST").is_file():
            return False
        path = root / (root / "LATEST").read_text().strip()
        self.engine.load(path / "model")
        self.state = DeliveryState.from_json(json.loads((path / "delivery.json").read_text()))
        self.gate.load_state(self.state.gate)
        self.metrics.inc("restores", help="checkpoints restored at start")
        return True

    # -- processing -----------------------------------------------------------
    def _dlq(self, reason: str, rec: Record, payload: bytes | None = None, row: int | None = None) -> None:
        key = dlq_key(rec, row)
        if key in self._dead:
            return
        self._dead.add(key)
        self.transport.produce(dlq_topic(rec.topic), dead_letter(reason, rec, payload, row), key=rec.key)
        name = "updates_rejected" if rec.topic == TOPIC_UPDATES else "events_dead_lettered"
        self.metrics.inc(name, help="inputs sent to a dead-letter topic")
        self.metrics.inc("dead_letters_by_reason", labels={"reason": reason_key(rec.topic, reason)}, help="dead letters by input topic and reason")
        log.warning("dead letter from %s[%d]@%d row=%s: %s", rec.topic, rec.partition, rec.offset, row, reason)

    def _decode(self, rec: Record) -> EventBatch | None:
        try:
            raw = decode_record(rec.value)
        except SchemaError as exc:
            self._dlq(exc.reason, rec)
            return None
        batch, bad = raw.validate()
        for row, reason in bad:  # each bad row dead-lettered alone, as a one-event batch record
            self._dlq(reason, rec, payload=encode_batch(raw.take(np.array([row])), compress=False), row=row)
        return batch

    def _dedup(self, batch: EventBatch) -> EventBatch:
        ids = batch.event_id
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(len(ids), dtype=bool)
        keep[first] = True
        keep &= ~self.state.seen_events.contains(ids)
        dup = int(len(ids) - keep.sum())
        if dup:
            self.metrics.inc("events_duplicate", dup, help="events skipped as already applied")
        return batch if dup == 0 else batch.take(keep)

    def _evaluate(self, batch: EventBatch) -> None:
        """Prequential HR@10/NDCG@10: score a sample of positives before training on them."""
        pos = np.flatnonzero(np.isin(batch.kind, _POS))
        if len(pos) == 0 or self.settings.eval_sample <= 0:
            return
        rng = np.random.default_rng(int(batch.event_id[pos[0]]))
        pick = rng.choice(pos, size=min(self.settings.eval_sample, len(pos)), replace=False)
        for i in pick:
            try:
                top = self.engine.topk(int(batch.user_id[i]), 10, int(batch.ts_ms[i]))
            except Exception:  # noqa: BLE001 - evaluation never stops training
                log.debug("topk failed during evaluation", exc_info=True)
                continue
            where = np.flatnonzero(top == batch.item_id[i])
            s = self.state
            s.evaluated += 1
            if len(where):
                s.hits += 1.0
                s.ndcg += 1.0 / float(np.log2(where[0] + 2))

    def _apply_events(self, rec: Record, batch: EventBatch) -> None:
        batch = self._dedup(batch)
        if len(batch) == 0:
            return
        avail = np.isin(batch.kind, _AVAIL)
        if avail.any():
            self.engine.apply_availability(batch.take(avail))
            self.state.availability_applied += int(avail.sum())
        users = batch.take(~avail) if avail.any() else batch
        if len(users):
            self._evaluate(users)
            self.engine.train(users)
        self.state.seen_events.add(batch.event_id)
        self.state.events_applied += len(batch)
        self.state.event_id_sum += int(batch.event_id.sum())
        self._since_refresh += len(users)  # user actions train the model; transitions only filter it
        self._since_ckpt += len(batch)
        if self._since_refresh >= self.settings.refresh_every_events:
            self._flush_updates()
            self._refresh()

    def _handle_update(self, rec: Record) -> None:
        from tandem.services.devices import digest

        update_id = digest(rec.value)
        if update_id in self.pending_updates or self.gate.is_duplicate(rec.value):
            self.metrics.inc("updates_duplicate", help="updates skipped as already applied")
            return
        try:
            update = self.gate.verify(rec.value)
        except Rejected as exc:
            self._dlq(exc.reason, rec)
            return
        if not self.pending_updates:
            self._pending_since = time.monotonic()
        self.pending_updates[update_id] = (update, rec)
        self.metrics.observe("update_bytes_received", len(rec.value))

    def _flush_updates(self) -> None:
        """One aggregation round over the buffered updates.

        An update the engine cannot apply goes to the DLQ with the reason and the worker goes
        on: when the round fails, each update is retried alone so only the bad ones are
        dead-lettered (a crash here would re-read the same update after every restart).
        """
        if not self.pending_updates:
            return
        pending, self.pending_updates = self.pending_updates, {}
        try:
            self.engine.apply_updates([u for u, _ in pending.values()])
            applied = list(pending)
        except Exception as exc:  # noqa: BLE001 - isolate the bad update(s), never crash-loop
            log.warning("aggregation round failed (%s); applying its %d updates one by one", exc, len(pending))
            applied = []
            for uid, (update, rec) in pending.items():
                try:
                    self.engine.apply_updates([update])
                    applied.append(uid)
                except Exception as one:  # noqa: BLE001
                    self._dlq(f"application failed: {type(one).__name__}: {one}"[:300], rec)
        self.state.updates_applied += len(applied)
        if applied:
            self.metrics.inc("updates_applied", len(applied), help="device updates aggregated")

    def _commit_offsets(self) -> None:
        """Commit the offsets of everything processed so far (``state.offsets``) to the broker."""
        for topic, cons in self.consumers.items():
            offs = self.state.offsets.get(topic)
            if offs:
                cons.commit(dict(offs))

    def _seek_to_state(self, topic: str, cons: Consumer, parts: Any) -> None:
        """Position ``cons`` at the restored state's next offset of each partition (0 when none)."""
        for part in parts:
            cons.seek(part, self.state.offsets.get(topic, {}).get(part, 0))

    def _advance(self, rec: Record) -> None:
        self.state.offsets.setdefault(rec.topic, {})[rec.partition] = rec.offset + 1

    def _events_from(self, topic: str, timeout_s: float) -> int:
        return self._process_events(self.consumers[topic].poll(self.settings.poll_records, timeout_s=timeout_s))

    def _process_events(self, recs: list[Record]) -> int:
        for rec in recs:
            batch = self._decode(rec)
            if batch is not None and len(batch):
                self._apply_events(rec, batch)
            self._advance(rec)
        return len(recs)

    def step(self, timeout_s: float = 0.2) -> int:
        """One bounded round over the three topics; returns records processed.

        Every topic is polled without waiting; only when all three came back empty does
        the worker block (up to ``timeout_s``) on ``interactions``. Blocking on an idle
        topic first would cap every other topic at ``poll_records`` per ``timeout_s``
        (device updates then lag far behind once the event stream pauses).
        """
        n = 0
        s = self.settings
        with self.lock:
            n += self._events_from(TOPIC_AVAILABILITY, 0.0)
            # Updates before events: a refresh the events trigger aggregates every update
            # that had arrived (the devices' uploads of the window the refresh closes).
            room = s.max_pending_updates - len(self.pending_updates)
            if room > 0:  # back-pressure: stop reading updates while the buffer is full
                for rec in self.consumers[TOPIC_UPDATES].poll(min(room, s.poll_records), timeout_s=0.0):
                    self._handle_update(rec)
                    self._advance(rec)
                    n += 1
            else:
                self.metrics.inc("backpressure_pauses", help="update polls skipped: buffer full")
            n += self._events_from(TOPIC_INTERACTIONS, 0.0)
        if n == 0 and timeout_s > 0:
            # Idle: wait for new events outside the lock (the HTTP API reads the model meanwhile).
            recs = self.consumers[TOPIC_INTERACTIONS].poll(s.poll_records, timeout_s=timeout_s)
            with self.lock:
                n += self._process_events(recs)
        with self.lock:
            full = len(self.pending_updates) >= min(s.max_pending_updates, s.aggregate_batch)
            overdue = time.monotonic() - self._pending_since >= s.aggregate_every_s
            idle = n == 0 and s.refresh_when_idle
            if self.pending_updates and (full or overdue or idle):
                self._flush_updates()
            if self._since_refresh >= s.refresh_every_events or (idle and self._since_refresh > 0):
                self._refresh()
        if n and not self._ckpt_root():
            # At-least-once without checkpoints: effects acknowledged, then offsets committed.
            self.transport.flush()
            self._commit_offsets()
        if self._ckpt_root() and self._since_ckpt > 0 and (
            self._since_ckpt >= s.checkpoint_every_events or time.monotonic() - self._last_ckpt >= s.checkpoint_every_s
        ):
            self.checkpoint()
        self._publish_gauges()
        return n

    def _refresh(self) -> None:
        version = self.engine.refresh()
        self.gate.set_model_version(version)
        self._since_refresh = 0
        self._announce(version)
        self.metrics.inc("refreshes", help="model refreshes published")

    def _announce(self, version: int) -> None:
        """Publish ``model-refresh``: the version, and what the engine ships with it (the shared reranker)."""
        msg = {"model_version": version, "events_applied": self.state.events_applied, "time_ms": int(time.time() * 1000)}
        payload = getattr(self.engine, "refresh_payload", None)
        if payload is not None:
            msg.update(payload())
        self.transport.produce(TOPIC_REFRESH, json.dumps(msg).encode())

    def _publish_gauges(self) -> None:
        st = self.state
        m = self.metrics
        m.set("model_version", self.engine.version, help="served model version")
        m.set("events_applied", st.events_applied, help="unique events applied to the model")
        m.set("event_id_sum", st.event_id_sum)
        m.set("availability_applied", st.availability_applied)
        m.set("user_events_applied", st.events_applied - st.availability_applied, help="user actions applied")
        m.set("updates_pending", len(self.pending_updates), help="verified updates waiting for aggregation")
        m.set("updates_applied_total", st.updates_applied)
        if st.evaluated:
            m.set("prequential_hr", st.hits / st.evaluated, help="prequential hit rate @10")
            m.set("prequential_ndcg", st.ndcg / st.evaluated, help="prequential NDCG @10")
        m.set("evaluated", st.evaluated)

    def lag(self) -> int:
        """Records not yet read on the consumed topics."""
        total = 0
        for cons in self.consumers.values():
            try:
                total += cons.lag()
            except Exception:  # noqa: BLE001 - lag is informative only
                return -1
        return total

    # -- lifecycle ------------------------------------------------------------
    def recover(self) -> None:
        """After a transport failure: rewind to the last checkpoint and re-read the DLQs.

        Effects since the checkpoint (model updates, dead letters whose produce may have
        failed) are redone from the log; the DLQ topic is the source of truth for which
        dead letters exist.
        """
        with self.lock:
            self.pending_updates = {}
            self._dead = set()
            self._load_dead_letters()
            if self.restore():
                for topic, cons in self.consumers.items():
                    self._seek_to_state(topic, cons, range(self.transport.partitions(topic)))
        log.info("recovered at events_applied=%d", self.state.events_applied)

    def run(self, max_idle_s: float | None = None, give_up_s: float = 300.0) -> None:
        """Process until ``stop()`` (or ``max_idle_s`` without records).

        Transport failures (broker unreachable, ...) are retried with backoff; after
        ``give_up_s`` of continuous failure the error propagates (the supervisor restarts us).
        """
        idle_since = time.monotonic()
        last_lag = 0.0
        failing_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    n = self.step()
                    if failing_since is not None:
                        failing_since = None
                        self.metrics.set("transport_ok", 1.0)
                except TransportError as exc:
                    now = time.monotonic()
                    failing_since = failing_since or now
                    self.metrics.inc("transport_errors", help="transport failures retried")
                    self.metrics.set("transport_ok", 0.0)
                    if now - failing_since > give_up_s:
                        raise
                    log.warning("transport error (retrying): %s", exc)
                    self._stop.wait(min(5.0, 0.5 + (now - failing_since) / 4))
                    try:
                        self.recover()
                    except TransportError as again:
                        log.warning("recovery failed (retrying): %s", again)
                    continue
                now = time.monotonic()
                if n:
                    idle_since = now
                elif max_idle_s is not None and now - idle_since > max_idle_s:
                    break
                if now - last_lag > 2.0:
                    self.metrics.set("consumer_lag", self.lag(), help="records behind the log end")
                    last_lag = now
        except BaseException as exc:
            self.error = exc
            log.exception("cloud worker failed")
            raise

    def stop(self) -> None:
        self._stop.set()

    def close(self, checkpoint: bool = True) -> None:
        """Flush updates, checkpoint and close consumers (a crash skips all of this)."""
        if checkpoint:
            with self.lock:
                self._flush_updates()
            self.checkpoint()
        for cons in self.consumers.values():
            cons.close()
        self.transport.flush()

    def health(self) -> dict[str, Any]:
        ok = self.error is None
        return {
            "status": "ok" if ok else "error",
            "model_version": self.engine.version,
            "events_applied": self.state.events_applied,
            **({"error": repr(self.error)} if not ok else {}),
        }


def build(settings: CloudSettings, transport: Transport | None = None) -> tuple[CloudWorker, Any]:
    """Open the transport, the engine named by ``settings.engine`` and the worker; returns (worker, http app)."""
    from tandem.services.engines import make_engine
    from tandem.services.metrics import add_metrics_routes
    from tandem.services.runtime import open_transport

    transport = transport or open_transport(settings.transport)
    engine = make_engine(settings.engine, settings)
    registry = Registry("cloud")
    worker = CloudWorker(settings, transport, engine, registry).open()
    app = add_metrics_routes(engine.http_app(), registry, health=worker.health)
    return worker, app


def serve(settings: CloudSettings, max_idle_s: float | None = None) -> None:
    """Run the cloud service until SIGTERM/SIGINT: HTTP API in a thread, worker in this one."""
    from tandem.services.runtime import run_worker_with_http

    worker, app = build(settings)
    run_worker_with_http(worker, app, settings.host, settings.port, max_idle_s)
