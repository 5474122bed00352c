"""Fleet: routing of each user's events to their device, fetch schedule, uploads, traffic counters, policies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from device_rerank.config import DeviceConfig
from device_rerank.envelope import Keyring, UpdateVerifier
from device_rerank.fleet import Fleet, FleetConfig, VectorCandidateSource
from device_rerank.policy import AlwaysUpload, ConnectivityWindow, DriftTriggered, PeriodicUpload
from device_rerank.reranker import Reranker
from streams.datasets.base import EventLog, finalize_events
from streams.schema import EventKind

torch.set_num_threads(1)
KEYRING = Keyring(b"fleet-test-master-secret-0000")
HOUR = 3_600_000


def make_world(n_users: int = 12, n_items: int = 300, events_per_user: int = 40, seed: int = 0):
    """Users engage with items from their own taste; each user gets a private item range so routing is checkable."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, 32)).astype(np.float32) / np.sqrt(32)
    users = {u: rng.normal(size=32).astype(np.float32) for u in range(100, 100 + n_users)}
    rows = []
    for u in users:
        own = np.arange(n_items)[(np.arange(n_items) % n_users) == (u - 100)]
        t = int(rng.integers(0, HOUR))
        for j in range(events_per_user):
            t += int(rng.integers(1_000, 120_000)) if j != events_per_user // 2 else 2 * HOUR  # one long gap
            item = int(rng.choice(own))
            kind = rng.choice([EventKind.IMPRESSION, EventKind.CLICK, EventKind.WATCH], p=[0.6, 0.25, 0.15])
            rows.append((t, u, item, float(rng.integers(1, 300)) if kind == EventKind.WATCH else 0.0, int(kind)))
    rows.append((HOUR // 2, -1, 5, 0.0, int(EventKind.STREAM_LIVE)))
    frame = pd.DataFrame(rows, columns=["ts_ms", "user_id", "item_id", "value", "kind"])
    log = EventLog("tiny", finalize_events(frame))
    source = VectorCandidateSource(np.arange(n_items), items, users, noise=0.1, seed=seed)
    return log, source


def test_routes_events_and_counts_traffic() -> None:
    log, source = make_world()
    received: list[bytes] = []
    cfg = FleetConfig(families=("feature", "parameter"), sweep_ms=HOUR, k=50)
    fleet = Fleet(Reranker(), source, KEYRING, cfg, policy=AlwaysUpload(), sink=received.append, model_version=1)
    rep = fleet.run(log)
    ev = log.events
    users = set(ev.user_id[ev.user_id >= 0].tolist())
    assert set(fleet.devices) == users and rep.devices == len(users)
    assert rep.events == len(ev)
    for u, dev in fleet.devices.items():
        mine = set(ev.item_id[(ev.user_id == u)].tolist())
        hist = set(dev.history.item[dev.history.order()].tolist())
        assert hist and hist <= mine
        assert dev.cloud_calls >= 2  # first event + the long gap (session start)
    assert rep.fetches == source.calls == sum(d.cloud_calls for d in fleet.devices.values())
    assert rep.bytes_down == sum(d.bytes_down for d in fleet.devices.values()) > 0
    assert sum(rep.bytes_up.values()) == sum(len(r) for r in received) > 0
    assert rep.uploads["feature"] > 0 and rep.uploads["parameter"] > 0
    assert rep.rescores > 0 and rep.latency_ms
    verifier = UpdateVerifier(KEYRING, current_model_version=1, n_params=fleet.model.num_parameters(), emb_dim=32)
    families = [verifier.verify(raw).family for raw in received]
    assert set(families) == {"feature", "parameter"}
    assert fleet.live == {5}


def test_fetch_when_list_exhausted() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(40, 32)).astype(np.float32)
    user = rng.normal(size=32).astype(np.float32)
    source = VectorCandidateSource(np.arange(40), items, {100: user})
    top = source.candidates(100, 10).item_ids
    source.calls = 0
    frame = pd.DataFrame(
        {"ts_ms": np.arange(8) * 1000, "user_id": 100, "item_id": top[:8], "value": 0.0, "kind": int(EventKind.IMPRESSION)}
    )
    fleet = Fleet(Reranker(), source, KEYRING, FleetConfig(k=10, min_remaining=3, refresh_ms=10**12, session_gap_ms=10**12))
    fleet.run(EventLog("exhaust", finalize_events(frame)))
    # first event fetches; after 8 distinct shown items only 2 < 3 remain, so the next event would refetch
    assert source.calls == 1 and fleet.devices[100].remaining() == 2
    assert fleet._needs_fetch(fleet.devices[100], 8000)


def test_policies_save_traffic() -> None:
    log, source = make_world(seed=1)
    cfg = FleetConfig(families=("feature",), sweep_ms=HOUR // 4)
    always = Fleet(Reranker(), source, KEYRING, cfg, policy=AlwaysUpload()).run(log)
    drift = Fleet(Reranker(), source, KEYRING, cfg, policy=DriftTriggered(threshold=0.3)).run(log)
    periodic = Fleet(Reranker(), source, KEYRING, cfg, policy=PeriodicUpload(every_ms=4 * HOUR)).run(log)
    assert 0 < drift.uploads["feature"] < always.uploads["feature"]
    assert 0 < periodic.uploads["feature"] < always.uploads["feature"]
    nightly = Fleet(Reranker(), source, KEYRING, cfg, window=ConnectivityWindow("nightly", hours=4)).run(log, final_sweep=False)
    assert nightly.uploads["feature"] < always.uploads["feature"]


def test_policy_units() -> None:
    p = PeriodicUpload(every_ms=1000)
    assert p.should_upload(1, 0, None)
    p.mark_sent(1, 0, None)
    assert not p.should_upload(1, 999, None) and p.should_upload(1, 1000, None) and p.should_upload(2, 10, None)
    d = DriftTriggered(threshold=0.1)
    v = np.array([1.0, 0.0])
    assert not d.should_upload(1, 0, None) and d.should_upload(1, 0, v)
    d.mark_sent(1, 0, v)
    assert not d.should_upload(1, 0, np.array([1.0, 0.1]))
    assert d.should_upload(1, 0, np.array([0.0, 1.0]))


def test_policies_keep_each_family_apart() -> None:
    """A frequent family (interest vectors) must not starve a rarer one (parameter deltas)."""
    d = DriftTriggered(threshold=0.1)
    v = np.array([1.0, 0.0])
    d.mark_sent(1, 0, v, family="feature")
    assert not d.should_upload(1, 0, v, family="feature")
    assert d.should_upload(1, 0, v, family="parameter")  # nothing sent for this family yet
    d.mark_sent(1, 0, v, family="parameter")
    assert not d.should_upload(1, 0, v, family="parameter") and not d.should_upload(1, 0, v, family="feature")
    p = PeriodicUpload(every_ms=1000)
    p.mark_sent(1, 0, None, family="feature")
    assert not p.should_upload(1, 10, None, family="feature") and p.should_upload(1, 10, None, family="parameter")


@pytest.mark.parametrize("mode", ["nightly", "random"])
def test_connectivity_windows(mode: str) -> None:
    w = ConnectivityWindow(mode, hours=6, seed=3)
    times = np.arange(0, 20 * 24 * HOUR, HOUR // 4)
    for dev in (1, 2, 3):
        frac = np.mean([w.is_open(dev, int(t)) for t in times])
        assert frac == pytest.approx(6 / 24, abs=0.02)
    assert [w.is_open(7, int(t)) for t in times[:200]] == [w.is_open(7, int(t)) for t in times[:200]]
    assert ConnectivityWindow("always").is_open(1, 0)
    with pytest.raises(ValueError):
        ConnectivityWindow("sometimes").is_open(1, 0)


def test_broadcast_updates_devices() -> None:
    log, source = make_world(n_users=3, events_per_user=10)
    fleet = Fleet(Reranker(), source, KEYRING, FleetConfig(device=DeviceConfig()))
    fleet.run(log)
    new = Reranker()
    fleet.broadcast(new, 7)
    assert all(d.model is new and d.model_version == 7 for d in fleet.devices.values())
