"""The simulated fleet split by user over Ray actors (``run_prequential(..., fleet_shards=N)``).

Devices are independent between cloud syncs, so one replay's devices can run in N processes:
shard ``s`` owns, for every strategy that reranks, a ``StrategyFleet`` of the users with
``user_id % N == s`` (its own copy of the strategy, whose upload policy keeps per-device
state). The driver keeps the cloud, the baselines, the served lists and the logs.

Per window, over the wire (``FleetShards.start_window``), concurrently to every shard:

* to a shard: its users' events (``Window.take``: event indices, users, times, items, kinds,
  values, point/fetch/sync flags and the live set at each), per strategy the served
  ``Candidates`` of its fetches, and the latency-sample flags (the driver counts points
  globally, so it decides which re-scores are timed);
* back: what each point showed per (strategy, event index) (``ranking[:maxk]``, latency or
  None, when the list was fetched), the uploads sent meanwhile (``(envelope, event index)``)
  and the shard's busy seconds (``finish_window``, after the driver trained the cloud on the
  window meanwhile: device work and cloud training overlap).

At a round the driver sorts the collected uploads by event index (stable: one event's uploads
come from one shard, in send order), exactly as in process, and a new shared reranker goes to
every shard once (``ray.put``). Each shard runs ``waves.device_waves``: the same code as in
process, on a subset of whole users, so the results are identical (tests/test_fleet_shards.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from device_rerank.reranker import Reranker
from streams.candidates import Candidates
from tandem.evaluation.waves import Shown, Window, device_waves, set_models
from tandem.strategies.fleet import StrategyFleet

logger = logging.getLogger(__name__)


class ShardsUnavailable(RuntimeError):
    """Ray is missing or would not start (the message is one line)."""


class FleetShard:
    """One shard's fleets (one per strategy with devices); a Ray actor's state."""

    def __init__(self, fleets: Sequence[StrategyFleet]) -> None:
        import torch

        torch.set_num_threads(1)  # tiny per-user forwards, as in process
        self.fleets = list(fleets)

    def run_window(self, w: Window, served: Sequence[dict[int, Candidates]], timed: np.ndarray, maxk: int) -> tuple[Shown, list[list[tuple[bytes, int]]], float]:
        """``device_waves`` on this shard's events; also returns each fleet's new uploads and the busy seconds."""
        t0 = time.perf_counter()
        shown = device_waves(w, self.fleets, served, timed, maxk)
        return shown, [f.take_outbox() for f in self.fleets], time.perf_counter() - t0

    def set_models(self, models: dict[int, tuple[Reranker, int]], trials: dict[int, tuple[Reranker | None, int]] | None = None) -> None:
        set_models(self.fleets, models, trials)

    def traffic(self) -> list[tuple[int, int, int]]:
        return [(f.bytes_up, f.bytes_down, f.uploads) for f in self.fleets]


class FleetShards:
    """``waves.LocalFleets``' methods over ``n`` Ray actors, users split by ``user_id % n``.

    Args:
        fleets: fresh fleets (no devices yet), one per strategy with devices; every shard
            gets a copy of all of them.
        n: shards (actors). They are scheduled with no CPU reserved, so more shards than
            cores still start (they then share the cores).
    """

    def __init__(self, fleets: Sequence[StrategyFleet], n: int) -> None:
        if n < 1:
            raise ValueError(f"fleet shards must be 1 or more, got {n}")
        self.n = int(n)
        self.n_fleets = len(fleets)
        self.busy_s = 0.0  # per window, the busiest shard's device seconds, summed
        self.work_s = 0.0  # every shard's device seconds, summed (busy_s x n when the split is even and cores are free)
        self.wire_s = 0.0  # the driver's share of the wire: split and send, then merge (transfers overlap the shards' work)
        self._outbox: list[list[tuple[bytes, int]]] = [[] for _ in fleets]
        t0 = time.perf_counter()
        self._ray, self._started = connect()
        ray = self._ray
        try:
            actor = ray.remote(num_cpus=0, runtime_env={"env_vars": {"PYTHONPATH": _code_path()}})(FleetShard)  # this checkout's code, even in a cluster already up
            blob = ray.put(list(fleets))
            self.actors = [actor.remote(blob) for _ in range(self.n)]
            ray.get([a.traffic.remote() for a in self.actors])  # up and answering (raises here if not)
        except Exception as exc:
            self.close()
            raise ShardsUnavailable(f"fleet shard actors did not start: {_first_line(exc)}") from None
        self.start_s = time.perf_counter() - t0  # Ray (unless already up) and the actors, to the first answer

    def start_window(self, w: Window, served: Sequence[dict[int, Candidates]], timed: np.ndarray, maxk: int) -> list[Any]:
        """Send every shard its share of the window (all calls in flight at once); returns the futures."""
        t0 = time.perf_counter()
        owner = w.users % self.n
        calls = []
        for s, actor in enumerate(self.actors):
            offsets = np.flatnonzero(owner == s)
            if not len(offsets):
                continue
            part = w.take(offsets)
            fetched = part.idx[part.fetch & part.is_pos].tolist()
            srv = [{j: by_event[j] for j in fetched} for by_event in served]
            calls.append(actor.run_window.remote(part, srv, timed[:, offsets], maxk))
        self.wire_s += time.perf_counter() - t0
        return calls

    def finish_window(self, calls: list[Any]) -> Shown:
        """Wait for the shards of ``start_window``; their shown lists merged, their uploads kept for the round."""
        results = self._ray.get(calls)
        t0 = time.perf_counter()
        shown: Shown = {}
        busy = 0.0
        for part_shown, outboxes, shard_s in results:
            shown.update(part_shown)
            for fi, out in enumerate(outboxes):
                self._outbox[fi].extend(out)
            busy = max(busy, shard_s)
            self.work_s += shard_s
        self.busy_s += busy
        self.wire_s += time.perf_counter() - t0
        return shown

    def take_outbox(self, fi: int) -> list[tuple[bytes, int]]:
        """Fleet ``fi``'s uploads from every shard since the last call (the caller sorts them by event index)."""
        out, self._outbox[fi] = self._outbox[fi], []
        return out

    def set_models(self, models: dict[int, tuple[Reranker, int]], trials: dict[int, tuple[Reranker | None, int]] | None = None) -> None:
        """Broadcast new shared rerankers and trials (put once; each shard applies them before its next window)."""
        if models or trials:
            ref, tref = self._ray.put(models), self._ray.put(trials or {})
            self._ray.get([a.set_models.remote(ref, tref) for a in self.actors])

    def traffic(self) -> list[tuple[int, int, int]]:
        """Per fleet: (bytes up, bytes down, uploads), summed over shards."""
        per_shard = self._ray.get([a.traffic.remote() for a in self.actors])
        return [tuple(int(sum(x)) for x in zip(*(p[fi] for p in per_shard))) for fi in range(self.n_fleets)]  # type: ignore[misc]

    def timings(self) -> dict[str, float]:
        return {"devices_busy_s": self.busy_s, "shards_work_s": self.work_s, "shards_wire_s": self.wire_s, "shards_start_s": self.start_s}

    def close(self) -> None:
        """End the actors; shut Ray down when this runner started it (a cluster already up is left running)."""
        ray = self._ray
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def connect() -> tuple[Any, bool]:
    """``(ray, started_here)``: the running Ray, or a local one started quietly.

    Local: ``num_cpus`` = the cores this process may use, no dashboard, workers' logs not
    forwarded.
    Raises ``ShardsUnavailable`` (one line) when Ray is missing or does not start.
    """
    try:
        import ray
    except ImportError as exc:
        raise ShardsUnavailable(f"fleet shards need Ray, which is not installed ({exc}); pip install ray==2.60.0") from None
    if ray.is_initialized():
        return ray, False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        ray.init(
            num_cpus=cores,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    except Exception as exc:
        raise ShardsUnavailable(f"could not start Ray for fleet shards: {_first_line(exc)}") from None
    return ray, True


def _code_path() -> str:
    """``PYTHONPATH`` for the shards: this checkout first (not another install of tandem)."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
