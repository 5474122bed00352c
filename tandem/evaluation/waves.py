"""One window of device work, wave by wave: the one implementation the evaluation runs in
process and inside each Ray fleet shard (``shards.py``).

A window is a mini-batch of events (``Window``, any subset that keeps each user's events
whole, e.g. one shard's users). ``device_waves`` runs every device's events in order for a
set of fleets and returns what each user was shown; the caller logs it. ``LocalFleets`` and
``shards.FleetShards`` are the two drivers of it (same methods): fleets in this process, or
fleets split by user over Ray actors. A window is started (``start_window``) and finished
(``finish_window``) apart, so the shards work while the driver trains the cloud on the window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from device_rerank.device import rescore_devices, time_single_rescore
from device_rerank.reranker import Reranker
from streams.candidates import Candidates
from tandem.strategies.fleet import StrategyFleet

#: What a user was shown at a prediction point, per (fleet index, event index):
#: (ranking[:maxk], timed re-score latency in seconds or None, when the shown list was fetched or None).
Shown = dict[tuple[int, int], tuple[np.ndarray, float | None, int | None]]


@dataclass
class Window:
    """Events of one mini-batch (or a shard's share of it) and the live view at each.

    ``idx`` holds the events' indices in the whole replay (uploads are tagged with them;
    served lists are keyed by them)."""

    idx: np.ndarray
    users: np.ndarray
    ts: np.ndarray
    items: np.ndarray
    kinds: np.ndarray
    vals: np.ndarray
    is_pos: np.ndarray
    fetch: np.ndarray
    sync: np.ndarray
    lives: list[set[int] | None]

    def __len__(self) -> int:
        return len(self.idx)

    def take(self, offsets: np.ndarray) -> Window:
        """The events at ``offsets`` (in order): a shard's share of the window."""
        return Window(
            self.idx[offsets], self.users[offsets], self.ts[offsets], self.items[offsets], self.kinds[offsets],
            self.vals[offsets], self.is_pos[offsets], self.fetch[offsets], self.sync[offsets], [self.lives[o] for o in offsets.tolist()],
        )

    def waves(self) -> list[list[int]]:
        """Window offsets grouped by each user's n-th event here: wave n holds every user's
        n-th event, in event order. A device sees its own events in order; devices are
        independent within a window (the served lists and shared reranker are fixed)."""
        seen: dict[int, int] = {}
        out: list[list[int]] = []
        for o, u in enumerate(self.users.tolist()):
            n = seen.get(u, 0)
            seen[u] = n + 1
            if n == len(out):
                out.append([])
            out[n].append(o)
        return out


def latency_flags(w: Window, logged: Sequence[int], every: int) -> np.ndarray:
    """``[fleet, offset]``: time this prediction point's re-score (a device-side latency sample).

    Every ``every``-th point of a fleet's prediction log is timed; ``logged`` is each fleet's
    log length at the window start. The driver computes it, since only it sees every user."""
    n_pos_before = np.cumsum(w.is_pos) - w.is_pos  # points logged in this window before each event
    return np.stack([w.is_pos & ((int(n0) + n_pos_before) % every == 0) for n0 in logged]) if len(logged) else np.zeros((0, len(w)), dtype=bool)


def device_waves(
    w: Window,
    fleets: Sequence[StrategyFleet],
    served: Sequence[dict[int, Candidates]],
    timed: np.ndarray,
    maxk: int,
) -> Shown:
    """Test, then learn, for fleets with devices over one window, wave by wave; returns what was shown.

    Same results as replaying the window event by event: every device handles its own
    events in order (fetch and sync, re-score, the ranking tested, then the action), and
    nothing a device does reads another device's state. What changes is the batching:
    the re-scores of a wave (up to one per device) run as one forward pass per shared
    model and list length (``rescore_devices``), and the syncs' personalization steps as
    one forward and backward pass per step (``StrategyFleet.receive_many``). Uploads are
    tagged with the event index (the caller puts them back in event order before a round).

    Args:
        w: the window's events (whole users only).
        fleets: the fleets to drive.
        served: per fleet, the candidates of each fetch in ``w`` (by event index).
        timed: ``[fleet, offset]`` latency flags (``latency_flags``).
        maxk: the shown rankings are cut to this length.
    """
    idx = w.idx.tolist()
    shown: Shown = {}
    for wave in w.waves():
        pos_wave = [o for o in wave if w.is_pos[o]]
        fetches = [o for o in pos_wave if w.fetch[o]]
        for fi, fleet in enumerate(fleets):  # phase 1: fetches and the syncs (personalization batched) and uploads that go with them
            fleet.receive_many([(int(w.users[o]), int(w.ts[o]), served[fi][idx[o]], bool(w.sync[o]), idx[o]) for o in fetches])
        # phase 2: one forward per shared model and list length for every device that must re-score
        reqs = []
        for fleet in fleets:
            for o in pos_wave:
                dev = fleet.device(int(w.users[o]))
                if dev is not None:
                    reqs.append((dev, int(w.ts[o]), w.lives[o]))
        rescore_devices(reqs)
        for fi, fleet in enumerate(fleets):  # phase 3: test (the ranking the user sees now), then learn
            for o in pos_wave:
                u, t = int(w.users[o]), int(w.ts[o])
                dev = fleet.device(u)
                lat = time_single_rescore(dev, t) if dev is not None and timed[fi, o] else None
                ranking = fleet.ranking(u, t, w.lives[o], None)  # a device applies its own consumed filter
                shown[fi, idx[o]] = (ranking[:maxk], lat, fleet.cached_at.get(u))
            for o in wave:
                fleet.observe(int(w.users[o]), int(w.ts[o]), int(w.items[o]), int(w.kinds[o]), float(w.vals[o]), bool(w.is_pos[o]), tag=idx[o])
    return shown


def set_models(fleets: Sequence[StrategyFleet], models: dict[int, tuple[Reranker, int]], trials: dict[int, tuple[Reranker | None, int]] | None) -> None:
    """``Fleets.set_models`` on fleets held here (in process, or inside one shard)."""
    for fi, (reranker, version) in models.items():
        fleets[fi].set_model(reranker, version)
    for fi, (trial, version) in (trials or {}).items():
        fleets[fi].set_trial(trial, version)


class Fleets(Protocol):
    """What the driver asks of the fleets with devices (``LocalFleets``, ``shards.FleetShards``);
    fleet ``fi`` is the ``fi``-th of the fleets it was built with."""

    def start_window(self, w: Window, served: Sequence[dict[int, Candidates]], timed: np.ndarray, maxk: int) -> Any: ...
    def finish_window(self, pending: Any) -> Shown: ...
    def take_outbox(self, fi: int) -> list[tuple[bytes, int]]: ...
    def set_models(self, models: dict[int, tuple[Reranker, int]], trials: dict[int, tuple[Reranker | None, int]] | None = None) -> None: ...
    def traffic(self) -> list[tuple[int, int, int]]: ...
    def timings(self) -> dict[str, float]: ...
    def close(self) -> None: ...


class LocalFleets:
    """The fleets with devices, driven in this process (``fleet_shards=0``)."""

    def __init__(self, fleets: Sequence[StrategyFleet]) -> None:
        self.fleets = list(fleets)
        self.busy_s = 0.0  # device work (here: all of it)

    def start_window(self, w: Window, served: Sequence[dict[int, Candidates]], timed: np.ndarray, maxk: int) -> Shown:
        """Run the window's device work (``device_waves``' arguments); ``finish_window`` hands back what was shown."""
        t0 = time.perf_counter()
        shown = device_waves(w, self.fleets, served, timed, maxk)
        self.busy_s += time.perf_counter() - t0
        return shown

    def finish_window(self, pending: Shown) -> Shown:
        return pending

    def take_outbox(self, fi: int) -> list[tuple[bytes, int]]:
        """Fleet ``fi``'s uploads since the last call (``(envelope, event index)``, in send order)."""
        return self.fleets[fi].take_outbox()

    def set_models(self, models: dict[int, tuple[Reranker, int]], trials: dict[int, tuple[Reranker | None, int]] | None = None) -> None:
        """Ship new shared rerankers, fleet index -> (reranker, version), and new trials to
        score, fleet index -> (trial reranker or None, its version)."""
        set_models(self.fleets, models, trials)

    def traffic(self) -> list[tuple[int, int, int]]:
        """Per fleet: (bytes up, bytes down, uploads)."""
        return [(f.bytes_up, f.bytes_down, f.uploads) for f in self.fleets]

    def timings(self) -> dict[str, float]:
        return {"devices_busy_s": self.busy_s}

    def close(self) -> None:
        pass
