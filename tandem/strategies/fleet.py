"""A strategy's client side: one fleet of devices and what each does at a fetch, a sync and an action.

The one device driver. The evaluation calls it in process for every strategy it replays;
the fleet service calls it from its consume loop with candidates fetched over HTTP. Only
the transport differs (Flower's client proxy): uploads land in ``outbox`` and the caller
ships them (to a round in process, or to the ``device-updates`` topic).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from streams.candidates import Candidates
from device_rerank.config import DeviceConfig
from device_rerank.device import Device, personalize_devices
from device_rerank.envelope import Keyring
from device_rerank.reranker import Reranker
from tandem.strategies.base import Strategy

_NO_ITEMS = np.zeros(0, dtype=np.int64)


def client_filter(ranking: np.ndarray, live: set[int] | None, consumed: set[int] | None) -> np.ndarray:
    """What any client does to a cached list before showing it: drop offline streams and consumed items."""
    if not len(ranking) or (live is None and not consumed):
        return ranking
    keep = [i for i in ranking.tolist() if (live is None or i in live) and (not consumed or i not in consumed)]
    return np.asarray(keep, dtype=np.int64)


class StrategyFleet:
    """The devices of one strategy.

    Args:
        strategy: what devices run and send (rerank, families, upload policy, personalization).
        reranker: the shared reranker devices start with (``set_model`` ships newer ones).
        model_version: its version.
        device_config: the base runtime config (the strategy adjusts it, e.g. data consent).
        keyring: derives each device's signing key.
        min_new_engagements: parameter/data uploads and personalization need this many new
            engagements on a device since its last one (a gradient over unchanged local data
            repeats itself; it also bounds device compute).
        seq_start: a new device's first envelope sequence number (a service restarting must
            never reuse one the cloud accepted); default 0.
    """

    def __init__(
        self,
        strategy: Strategy,
        reranker: Reranker,
        model_version: int,
        device_config: DeviceConfig,
        keyring: Keyring,
        min_new_engagements: int = 3,
        seq_start: Callable[[int], int] | None = None,
    ) -> None:
        self.strategy = strategy
        self.device_config = strategy.device_config(device_config)
        self.keyring = keyring
        self.min_new = int(min_new_engagements)
        self.seq_start = seq_start
        self.devices: dict[int, Device] = {}
        self.cached: dict[int, np.ndarray] = {}  # rerank off: the list as fetched
        self.cached_at: dict[int, int] = {}
        self.last_upload_n: dict[int, int] = {}
        self.last_personalize_n: dict[int, int] = {}
        self.outbox: list[tuple[bytes, int]] = []  # (envelope, caller's tag), in send order
        self.trial: Reranker | None = None  # a reranker the cloud asks devices to score (the ship gate)
        self.trial_version = -1
        self.trial_nbytes = 0
        self.evaluated: dict[int, int] = {}  # device -> newest trial version it scored
        self.evaluations = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.uploads = 0
        self.set_model(reranker, model_version)
        s = strategy
        # Strategies that never upload parameters/data nor personalize need no training groups.
        self.record_examples = bool(s.personalize_steps) or bool({"parameter", "data"} & set(s.families))
        self.scores_trials = bool({"parameter", "data"} & set(s.families))  # its uploads change the reranker

    def set_model(self, reranker: Reranker, model_version: int) -> None:
        """The newest shared reranker; each device takes it at its next sync."""
        self.reranker = reranker
        self.model_version = int(model_version)
        self.model_nbytes = reranker.int8_nbytes()

    def set_trial(self, reranker: Reranker | None, version: int = -1) -> None:
        """The reranker the cloud is trialling (None: none); devices score it at their next sync."""
        self.trial = reranker
        self.trial_version = int(version) if reranker is not None else -1
        self.trial_nbytes = reranker.int8_nbytes() if reranker is not None else 0

    def device(self, user_id: int) -> Device | None:
        return self.devices.get(int(user_id))

    def forget(self, user_id: int) -> None:
        """Drop a device and its bookkeeping (a service bounding its memory)."""
        u = int(user_id)
        for d in (self.devices, self.cached, self.cached_at, self.last_upload_n, self.last_personalize_n, self.evaluated):
            d.pop(u, None)

    def _new_device(self, u: int) -> Device:
        dev = Device(u, self.reranker, self.device_config, self.keyring.key_for(u), self.model_version)
        dev.record_examples = self.record_examples
        dev.record_trial_negatives = self.scores_trials
        if self.seq_start is not None:
            dev.seq = int(self.seq_start(u))
        self.strategy.configure_device(dev)
        self.devices[u] = dev
        return dev

    def receive(self, user_id: int, ts_ms: int, cands: Candidates, sync: bool, tag: int = 0) -> None:
        """A fetch came back. At a sync the device also takes the newest reranker,
        personalizes and considers fetch-time uploads; a page fetch only refreshes the list."""
        self.receive_many([(user_id, ts_ms, cands, sync, tag)])

    def receive_many(self, fetches: Sequence[tuple[int, int, Candidates, bool, int]]) -> None:
        """``receive`` for fetches ``(user_id, ts_ms, cands, sync, tag)`` of different users.

        The same as receiving them one by one (devices are independent), but the syncs'
        personalization runs batched across devices (``personalize_devices``).
        """
        s = self.strategy
        syncs: list[tuple[Device, int, int]] = []
        for user_id, ts_ms, cands, sync, tag in fetches:
            u, t = int(user_id), int(ts_ms)
            self.cached_at[u] = t
            if not s.rerank:
                self.cached[u] = cands.item_ids
                self.bytes_down += int(cands.item_ids.nbytes + cands.scores.nbytes)
                continue
            dev = self.devices.get(u) or self._new_device(u)
            if sync and dev.model is not self.reranker:
                dev.set_model(self.reranker, self.model_version)
                self.bytes_down += self.model_nbytes
            dev.receive(cands, t)
            self.bytes_down += cands.nbytes
            if sync:
                syncs.append((dev, t, tag))
                self._maybe_evaluate(dev, t, tag)
        if s.personalize_steps:
            due = [dev for dev, _, _ in syncs if dev.history.n - self.last_personalize_n.get(dev.device_id, 0) >= self.min_new]
            personalize_devices(due, s.personalize_steps)
            for dev in due:
                self.last_personalize_n[dev.device_id] = dev.history.n
        for dev, t, tag in syncs:
            self._maybe_upload(dev, "fetch", t, tag)

    def ranking(self, user_id: int, ts_ms: int, live: set[int] | None, consumed: set[int] | None) -> np.ndarray:
        """What the user sees now: the device's reranked list, or (rerank off) the cached list
        with the filter any client applies (live now; not ``consumed``)."""
        u = int(user_id)
        if self.strategy.rerank:
            dev = self.devices.get(u)
            return dev.ranking(int(ts_ms), live) if dev is not None else _NO_ITEMS
        return client_filter(self.cached.get(u, _NO_ITEMS), live, consumed)

    def observe(self, user_id: int, ts_ms: int, item_id: int, kind: int, value: float, engaged: bool, tag: int = 0) -> None:
        """An action on the device; an engagement may trigger an upload."""
        dev = self.devices.get(int(user_id)) if self.strategy.rerank else None
        if dev is None:
            return
        dev.observe(int(ts_ms), int(item_id), int(kind), float(value))
        if engaged:
            self._maybe_upload(dev, "engagement", int(ts_ms), tag)

    def take_outbox(self) -> list[tuple[bytes, int]]:
        out, self.outbox = self.outbox, []
        return out

    def _maybe_evaluate(self, dev: Device, t: int, tag: int) -> None:
        """At a sync, a device that has not scored the current trial does, on its fresh feedback
        (it downloads the trial only then), and sends the verdict."""
        if self.trial is None or not self.scores_trials or self.evaluated.get(dev.device_id, -1) >= self.trial_version:
            return
        env = dev.make_evaluation(self.trial, self.trial_version, t)
        if env is None:
            return  # no fresh feedback yet: it scores the trial at a later sync
        self.evaluated[dev.device_id] = self.trial_version
        raw = env.encode()
        self.outbox.append((raw, tag))
        self.bytes_down += self.trial_nbytes
        self.bytes_up += len(raw)
        self.uploads += 1
        self.evaluations += 1

    def _maybe_upload(self, dev: Device, trigger: str, t: int, tag: int) -> None:
        """Ask the strategy's policy whether to upload now; send each family that has something new."""
        s = self.strategy
        fams = s.families_for(trigger)
        if not fams:
            return
        pol = s.policy
        costly = [f for f in fams if f in ("parameter", "data")]
        if costly and dev.history.n - self.last_upload_n.get(dev.device_id, 0) < self.min_new:
            fams = tuple(f for f in fams if f not in costly)
            if not fams:
                return
        interest = dev.interest(t)
        sent_costly = False
        for fam in fams:  # each family is gated against its own last upload
            if not pol.should_upload(dev.device_id, t, interest, family=fam):
                continue
            env = dev.make_update(fam, t)
            if env is None:
                continue
            raw = env.encode()
            self.outbox.append((raw, tag))
            self.bytes_up += len(raw)
            self.uploads += 1
            pol.mark_sent(dev.device_id, t, interest, family=fam)
            sent_costly |= fam in costly
        if sent_costly:
            self.last_upload_n[dev.device_id] = dev.history.n
