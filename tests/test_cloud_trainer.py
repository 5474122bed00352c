"""Streaming training from a transport consumer, checkpoints and exact resume after a crash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest
import torch

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.trainer import OnlineTrainer
from streams.batch import EventBatch, encode_batch
from streams.datasets.base import EventLog
from streams.schema import EventKind
from streams.transport import Consumer, Record

torch.set_num_threads(1)

CFG = TwoTowerConfig(num_users=64, num_items=128, num_categories=4, embedding_dim=8, out_dim=8,
                     user_hidden=(16,), item_hidden=(16,), history_len=4, batch_size=32, user_id_dropout=0.2)  # fmt: skip


class MemoryConsumer(Consumer):
    """In-memory topic: {partition: [payload, ...]}; committed offsets survive 'restarts' (shared dict)."""

    def __init__(self, partitions: dict[int, list[bytes]], committed: dict[int, int] | None = None) -> None:
        self.topic, self.group = "interactions", "cloud"
        self.data = partitions
        self._committed = committed if committed is not None else {}
        self._pos = {p: self._committed.get(p, 0) for p in partitions}
        self.seeks: list[tuple[int, int]] = []

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        out: list[Record] = []
        for p in sorted(self.data):  # round-robin-ish: drain partitions in order
            while self._pos[p] < len(self.data[p]) and len(out) < max_records:
                off = self._pos[p]
                out.append(Record(self.topic, p, off, None, self.data[p][off], 0))
                self._pos[p] += 1
        return out

    def commit(self, offsets: Mapping[int, int] | None = None) -> None:
        self._committed.update(offsets if offsets is not None else self._pos)

    def committed(self) -> dict[int, int]:
        return dict(self._committed)

    def positions(self) -> dict[int, int]:
        return dict(self._pos)

    def seek(self, partition: int, offset: int) -> None:
        self.seeks.append((partition, offset))
        self._pos[partition] = offset

    def seek_to_beginning(self) -> None:
        self._pos = {p: 0 for p in self.data}

    def end_offsets(self) -> dict[int, int]:
        return {p: len(v) for p, v in self.data.items()}

    def close(self) -> None:
        pass


def stream(records: int, per_record: int = 32, seed: int = 0) -> list[EventBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for r in range(records):
        n = per_record
        u = rng.integers(0, 40, n)
        it = (u % 4) * 20 + rng.integers(0, 20, n)
        out.append(EventBatch.from_columns(event_id=np.arange(r * n, (r + 1) * n), ts_ms=np.arange(r * n, (r + 1) * n),
                                           user_id=u, item_id=it, value=np.ones(n), kind=np.full(n, int(EventKind.CLICK))))  # fmt: skip
    return out


def topic(batches: list[EventBatch]) -> dict[int, list[bytes]]:
    """Two partitions (by record parity), like a keyed topic."""
    parts: dict[int, list[bytes]] = {0: [], 1: []}
    for j, b in enumerate(batches):
        parts[j % 2].append(encode_batch(b))
    return parts


def params(t: OnlineTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


def test_run_consumes_skips_bad_records_and_tracks_offsets(caplog: pytest.LogCaptureFixture) -> None:
    parts = topic(stream(6))
    parts[0].insert(1, b"\x00garbage")  # undecodable record
    bad = stream(1)[0]
    bad = EventBatch.from_columns(**{c: getattr(bad, c) for c in ("event_id", "ts_ms", "user_id", "item_id", "value")},
                                  kind=np.where(np.arange(32) < 3, 99, int(EventKind.CLICK)))  # 3 invalid rows  # fmt: skip
    parts[1].append(encode_batch(bad))
    c = MemoryConsumer(parts)
    t = OnlineTrainer(CFG)
    with caplog.at_level("WARNING"):
        n = t.run(c)
    assert n == 8 and t.skipped_records == 1 and t.skipped_rows == 3
    assert t.events_trained == 6 * 32 + 29
    assert t.offsets == {0: 4, 1: 4} and c.committed() == {0: 4, 1: 4}
    assert "skipping record" in caplog.text and "invalid rows" in caplog.text
    assert t.run(c) == 0  # drained


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    batches = stream(16)
    # uninterrupted reference
    ref = OnlineTrainer(CFG)
    ref.run(MemoryConsumer(topic(batches)), checkpoint_every=4, checkpoint_path=tmp_path / "ref.pt")
    # crashed run: train 7 records, checkpoint every 4 -> last checkpoint after record 4 ...
    committed: dict[int, int] = {}
    a = OnlineTrainer(CFG)
    ckpt = tmp_path / "cloud.pt"
    a.run(MemoryConsumer(topic(batches), committed), max_records=4, checkpoint_every=4, checkpoint_path=ckpt)
    a.run(MemoryConsumer(topic(batches), committed), max_records=3)  # ... 3 more trained, then "crash" (no checkpoint)
    assert a.events_trained == 7 * 32 and committed == {0: 7}  # group offsets ran ahead of the checkpoint
    del a
    # restart: restore, and the trainer seeks the consumer back to the checkpointed offsets
    b = OnlineTrainer(CFG)
    b.load(ckpt)
    assert b.offsets == {0: 4} and b.events_trained == 4 * 32  # the consumer drained partition 0 first
    c = MemoryConsumer(topic(batches), committed)
    b.run(c, checkpoint_every=4, checkpoint_path=ckpt)
    assert (0, 4) in c.seeks and (1, 0) in c.seeks  # partition 1: not in the checkpoint -> from its start
    assert b.events_trained == ref.events_trained == 16 * 32  # nothing lost, nothing twice
    assert b.steps == ref.steps
    for p, q in zip(params(b), params(ref)):
        assert torch.allclose(p, q, atol=1e-6)
    assert (b.history.count == ref.history.count).all()
    assert np.array_equal(b.item_counts, ref.item_counts)


def test_checkpoint_is_atomic_and_rejects_junk(tmp_path: Path) -> None:
    t = OnlineTrainer(CFG)
    t.train_batch(stream(1)[0])
    path = t.save(tmp_path / "c.pt")
    assert path.is_file() and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        OnlineTrainer(CFG).load(junk)
    with pytest.raises(FileNotFoundError):
        OnlineTrainer(CFG).load(tmp_path / "missing.pt")
    other = TwoTowerConfig(**{**CFG.__dict__, "out_dim": 4})
    with pytest.raises(ValueError, match="different config"):
        OnlineTrainer(other).load(path)


def test_fit_warm_start_counts_each_event_once() -> None:
    b = EventBatch.concat(stream(8))
    log = EventLog(name="t", events=b.to_frame())
    t = OnlineTrainer(CFG)
    m = t.fit(log, epochs=3)
    assert t.events_trained == len(b) and int(t.item_counts.sum()) == len(b)
    assert t.history.count.sum() == len(b) and np.isfinite(m["loss"])
    with pytest.raises(ValueError):
        t.fit(log, epochs=0)


def test_run_rejects_checkpoint_every_without_path() -> None:
    with pytest.raises(ValueError):
        OnlineTrainer(CFG).run(MemoryConsumer({0: []}), checkpoint_every=2)
