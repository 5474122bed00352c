"""The prequential protocol: what is predicted when, what counts as relevant, what is live.

Kept apart from the driver (``prequential.py``), as River keeps scheduling apart from
``progressive_val_score``: the configuration, the prediction points, the devices' fetch and
sync flags (the fleet's own ``SyncSchedule``), the relevant sets, the fetch requests of a
window (each with the device's session as of its own event), availability, and the domain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from cloud_recsys.recommender import CloudRecommender, Request, Session
from streams.datasets.base import EventLog
from streams.schema import AVAILABILITY_KINDS
from tandem.evaluation.metrics import KS
from tandem.strategies.schedule import ScheduleConfig, SyncSchedule
from tandem.strategies.server import TRIAL_MAX_ROUNDS, TRIAL_MIN_DEVICES


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of the replay protocol.

    Args:
        k: candidates per fetch (the device's cached list).
        batch_size: events per cloud mini-batch (ingestion granularity).
        refresh_every: events between cloud refreshes / aggregation rounds (R).
        fetch_every_ms: a device re-fetches after this long within a session (T).
        session_gap_ms: inactivity that starts a new session (and a fetch).
        ks: metric cut-offs.
        relevant_window: Recall@K's relevant set = distinct items of the next this-many
            positives of the user within the session (including the target).
        domain: "repeat" (items are consumed again: livestreams, sessions), "feed" (a consumed
            item is never shown again) or "auto" (``resolve_domain``).
        refetch_every: a device fetches again after this many engagements within a session
            (its session travels with the fetch; 0 = only on session start and time).
        max_staleness_rounds: the verifier accepts updates this many versions old.
        n_boot: bootstrap replicates.
        max_events: replay only the first N events (None = all).
        cloud_dim: embedding width of the cloud model (and the reranker).
        data_fit_steps: cloud steps fitting the reranker head on data-family examples per round.
        latency_sample_every: time one unbatched on-device re-score every this many rankings.
        min_new_engagements: parameter/data uploads and personalization need this many new
            engagements on the device since its last one.
        data_fit_lr, data_fit_l2: Adam step and pull-to-previous of the cloud fit on data examples.
        trust_radius: the shared reranker that learned strategies ship stays within this L2
            distance of the reranker the fleet started with (None = unbounded). 0.5 measured
            on Twitch: data -26.9% -> +3.2%, federated -5.2% -> +2.8% NDCG@10 vs cloud-only
            (whole log); 2.0 changed nothing on the first 20k events.
        trial_min_devices / trial_max_rounds: the ship gate of learned strategies
            (``StrategyCloud``): a changed reranker ships only when this many devices scored it
            no worse than the shipped one on fresh feedback, within that many rounds (0: no gate).
        seed: everything random.
    """

    k: int = 100
    batch_size: int = 256
    refresh_every: int = 1000
    fetch_every_ms: int = 30 * 60_000
    session_gap_ms: int = 30 * 60_000
    ks: tuple[int, ...] = KS
    relevant_window: int = 20
    domain: str = "auto"
    refetch_every: int = 1
    max_staleness_rounds: int = 8
    n_boot: int = 1000
    max_events: int | None = None
    cloud_dim: int = 32
    data_fit_steps: int = 30
    latency_sample_every: int = 20
    min_new_engagements: int = 3
    data_fit_lr: float = 0.05
    data_fit_l2: float = 1.0
    trust_radius: float | None = 0.5
    trial_min_devices: int = TRIAL_MIN_DEVICES
    trial_max_rounds: int = TRIAL_MAX_ROUNDS
    seed: int = 0


#: The cloud the loop drives (``cloud_recsys.recommender.CloudRecommender``).
CloudModel = CloudRecommender
#: Builds the cloud for a log: (log, config, exclude_consumed, allowed_at) -> CloudRecommender.
CloudFactory = Callable[[EventLog, "EvalConfig", bool, Callable[[int], "np.ndarray | None"] | None], CloudRecommender]


# -- the replayed events ------------------------------------------------------------
def user_events(log: EventLog, config: EvalConfig) -> pd.DataFrame:
    """The events the loop replays: the first ``max_events`` rows, less stream-availability rows
    (those only say what is live; ``LiveIndex`` reads them from ``log.availability``)."""
    ev = log.events
    if config.max_events is not None:
        ev = ev.iloc[: config.max_events]
    avail = np.array(sorted(int(k) for k in AVAILABILITY_KINDS), dtype=np.uint8)
    return ev[~np.isin(ev.kind.to_numpy(), avail)].reset_index(drop=True)


def replayed_events(log: EventLog, config: EvalConfig) -> int:
    """How many events one replay steps through (the progress bar's total per worker)."""
    return len(user_events(log, config))


# -- availability ---------------------------------------------------------------
class LiveIndex:
    """Items live at a time, from ``EventLog.availability`` (None everywhere when unknown)."""

    def __init__(self, log: EventLog) -> None:
        a = log.availability
        self.enabled = a is not None and len(a) > 0
        self._cache: dict[int, tuple[np.ndarray, set[int]]] = {}
        if self.enabled:
            order = np.argsort(a.start_ms.to_numpy(), kind="stable")
            self.start = a.start_ms.to_numpy()[order].astype(np.int64)
            self.end = a.end_ms.to_numpy()[order].astype(np.int64)
            self.item = a.item_id.to_numpy()[order].astype(np.int64)
            self.max_len = int((self.end - self.start).max()) if len(self.start) else 0

    def at(self, ts_ms: int) -> tuple[np.ndarray, set[int]] | None:
        if not self.enabled:
            return None
        hit = self._cache.get(ts_ms)
        if hit is None:
            lo = int(np.searchsorted(self.start, ts_ms - self.max_len, side="left"))
            hi = int(np.searchsorted(self.start, ts_ms, side="right"))
            m = self.end[lo:hi] > ts_ms
            ids = np.unique(self.item[lo:hi][m])
            hit = (ids, set(ids.tolist()))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[ts_ms] = hit
        return hit


def sync_flags(users: np.ndarray, ts: np.ndarray, is_pos: np.ndarray, config: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fetch, sync) flags per event, from the fleet's own ``SyncSchedule``."""
    sched = SyncSchedule(ScheduleConfig(config.session_gap_ms, config.fetch_every_ms, config.refetch_every))
    fetch = np.zeros(len(users), dtype=bool)
    sync = np.zeros(len(users), dtype=bool)
    for j, (u, t, p) in enumerate(zip(users.tolist(), ts.tolist(), is_pos.tolist())):
        fetch[j], sync[j] = sched.step(u, t, p)
    return fetch, sync


def prediction_points(users: np.ndarray, ts: np.ndarray, items: np.ndarray, positive: np.ndarray, gap_ms: int) -> np.ndarray:
    """Positives that are a new choice: drop a positive whose user's previous positive was the
    same item within ``gap_ms`` (the WATCH that completes a LIVE_ENTER, a re-entered stream).

    Such events are still observed by every learner; they are just not scored, since
    predicting "the item you are watching" would flatter any model that remembers it.
    """
    out = positive.copy()
    last: dict[int, tuple[int, int]] = {}
    for j in np.flatnonzero(positive).tolist():
        u, it, t = int(users[j]), int(items[j]), int(ts[j])
        prev = last.get(u)
        if prev is not None and prev[0] == it and t - prev[1] <= gap_ms:
            out[j] = False
        last[u] = (it, t)
    return out


def relevant_sets(users: np.ndarray, ts: np.ndarray, items: np.ndarray, is_pos: np.ndarray, config: EvalConfig) -> list[set[int] | None]:
    """Recall@K labels per event: distinct items of the user's next ``relevant_window`` positives in-session.

    Labels may look ahead (they are what is scored), predictions never do.
    """
    out: list[set[int] | None] = [None] * len(users)
    by_user: dict[int, list[int]] = {}
    for j in np.flatnonzero(is_pos).tolist():
        by_user.setdefault(int(users[j]), []).append(j)
    w = config.relevant_window
    for idx in by_user.values():
        for a, j in enumerate(idx):
            rel = {int(items[j])}
            for b in range(a + 1, min(a + w, len(idx))):
                jb = idx[b]
                if ts[jb] - ts[idx[b - 1]] > config.session_gap_ms:
                    break
                rel.add(int(items[jb]))
            out[j] = rel
    return out


def window_requests(
    fidx: np.ndarray,
    users: np.ndarray,
    ts: np.ndarray,
    items: np.ndarray,
    positive: np.ndarray,
    w0: int,
    sessions: dict[int, deque[tuple[int, int]]],
    engaged: dict[int, set[int]],
    session_len: int,
    repeat_domain: bool,
    allowed_at: Callable[[int], np.ndarray | None] | None,
) -> list[Request]:
    """The fetch requests of one window, each carrying the device's session as of its own event.

    ``sessions``/``engaged`` hold the state at the window start; the window's earlier
    positives are replayed on copies (a device sees its user's actions at once), so a
    fetch carries exactly the events before it, never its own or a later one.
    """
    fset = set(fidx.tolist())
    fusers = set(users[fidx].tolist())
    local = {u: deque(sessions.get(u, ()), maxlen=session_len) for u in fusers}
    consumed = None if repeat_domain else {u: set(engaged.get(u, ())) for u in fusers}
    out: list[Request] = []
    for j in range(w0, int(fidx.max()) + 1):
        u = int(users[j])
        if u not in local:
            continue
        if j in fset:
            sess = Session.from_pairs(local[u])
            t = int(ts[j])
            out.append(Request(u, t, sess, allowed_at(t) if allowed_at is not None else None, set(consumed[u]) if consumed is not None else None))
        if positive[j]:
            local[u].append((int(items[j]), int(ts[j])))
            if consumed is not None:
                consumed[u].add(int(items[j]))
    return out


def resolve_domain(domain: str, has_availability: bool, users: np.ndarray, items: np.ndarray, positive: np.ndarray) -> bool:
    """Whether the log is a repeat-consumption domain ("repeat"), or a feed where consumed items are
    never shown again ("feed"). "auto": repeat when the log carries availability (livestreams),
    or when at least 5% of the positives in the first 10% of the log repeat an item the user
    already consumed (a warm-up prefix; the rest of the log is not looked at).
    """
    if domain not in ("auto", "feed", "repeat"):
        raise ValueError(f"domain must be auto, feed or repeat, got {domain!r}")
    if domain != "auto":
        return domain == "repeat"
    if has_availability:
        return True
    idx = np.flatnonzero(positive)
    idx = idx[: max(1, len(idx) // 10)]
    seen: set[tuple[int, int]] = set()
    rep = 0
    for j in idx.tolist():
        key = (int(users[j]), int(items[j]))
        rep += key in seen
        seen.add(key)
    return len(idx) > 0 and rep / len(idx) >= 0.05


