"""Prequential (test-then-train) replay of an event log through the whole device-cloud loop.

Protocol (River's ``progressive_val_score`` applied to a recommender system):

* Events are replayed in time order in mini-batches of ``batch_size``. The cloud
  ingests (trains on) a mini-batch only after every prediction inside it was made,
  so a prediction never sees its own event or any later one.
* Every positive interaction is a prediction point: the ranking the user would
  see at that moment is scored against the item they engaged with, then every
  learner (cloud, devices, baselines) learns from the event.
* The cloud refreshes every ``refresh_every`` events: it rebuilds the served item
  vectors (its index), and each strategy runs an aggregation round over the device
  updates received since the last one. Lists served between refreshes come from the
  last snapshot (staleness is part of the protocol, and is measured).
* A device syncs at a session start (gap > ``session_gap_ms``) and every
  ``fetch_every_ms`` (new reranker, personalization, fetch-time uploads) and fetches a
  fresh list after every ``refetch_every`` engagements; each fetch carries its recent
  items (``cloud_recsys.recommender.Session``), from which the cloud builds the query.
  Between fetches it shows its cached list: cloud-only with the filter any client
  applies; device strategies rerank it on every action with fresh context.
* Livestreams are availability-aware (Rappaz et al., RecSys 2021): the cloud only
  retrieves items live at fetch time, devices filter to items live now.
* Feeds without repeats (``domain``, see ``resolve_domain``): the cloud excludes every item
  the device reports consumed; devices and cloud-only's display drop them too.
* Baselines (``baselines.py``) are scored on the same points.

Sharing work: one cloud training pass serves every strategy. Strategy-specific
cloud state (interest vectors, item-row deltas, reranker weights) is an overlay on
the shared model (``StrategyCloud``); retrieval is batched over all fetches of a
mini-batch and shared between strategies whose overlays are empty.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from cloud_recsys.candidates import Candidates, quantize_rows
from cloud_recsys.recommender import CloudRecommender, Request, Session
from device_rerank.config import CTX_FEATURES, DeviceConfig, RerankerConfig
from device_rerank.device import Device
from device_rerank.encoders import HardExamples
from device_rerank.envelope import DecodedUpdate, Keyring, UpdateRejected, UpdateVerifier
from device_rerank.reranker import Reranker
from streams.batch import EventBatch
from streams.datasets.base import EventLog
from streams.schema import AVAILABILITY_KINDS, POSITIVE_KINDS
from tandem.evaluation.baselines import DESCRIPTIONS as _BASELINE_DESC
from tandem.evaluation.baselines import Baselines
from tandem.evaluation.clouds import recommender_for
from tandem.evaluation.bootstrap import bootstrap_many, paired_relative_diff
from tandem.evaluation.metrics import KS, PredictionLog, device_days, latency_summary, metric_names, ndcg_at_k, per_point_values, time_series
from tandem.evaluation.results import EvaluationResult, Points, StrategyResult
from tandem.strategies.base import Strategy

logger = logging.getLogger(__name__)

_POS = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)
_AVAIL = np.array(sorted(int(k) for k in AVAILABILITY_KINDS), dtype=np.uint8)
_RANK_FRAC = CTX_FEATURES.index("rank_frac")


# -- configuration ------------------------------------------------------------
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
    seed: int = 0


#: The cloud the loop drives (``cloud_recsys.recommender.CloudRecommender``).
CloudModel = CloudRecommender
#: Builds the cloud for a log: (log, config, exclude_consumed, allowed_at) -> CloudRecommender.
CloudFactory = Callable[[EventLog, "EvalConfig", bool, Callable[[int], "np.ndarray | None"] | None], CloudRecommender]


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


# -- devices ----------------------------------------------------------------------
class LazyDevice(Device):
    """``Device`` that defers re-scoring to the next ``ranking`` call.

    Same rankings as ``Device`` (ranking re-scores whenever something changed since the
    last score), but a trigger followed by another trigger before anyone looks costs one
    forward pass instead of two - the replay calls ``observe`` then ``ranking`` per event.

    ``record_examples`` (set by the loop) is False for strategies that never use the
    example buffer (no parameter/data uploads, no personalization): building training
    groups there is pure cost, and nothing they rank or send depends on it.
    """

    record_examples: bool = True

    def _rescore(self, at_ms: int) -> None:  # type: ignore[override]
        self._dirty = True

    def _record_example(self, ts_ms: int, item_id: int, emb: np.ndarray) -> None:
        """Only engagements with an item of the cached list make a training group.

        ``Device`` also records engagements with items outside the list, giving the
        positive placeholder features (rank_frac = 1, cloud z = ``inject_cloud_z``) that no
        negative ever has; every learner (patch, FedSGD, data fit) then learns "rank the
        bottom of the cloud list first" and NDCG collapses (measured: 0.44 -> 0.09 on Twitch).
        """
        if self.record_examples and item_id in self._cloud_set:
            super()._record_example(ts_ms, item_id, emb)

    def ranking(self, at_ms: int, live: set[int] | None = None) -> np.ndarray:
        if live is not None and live != self._live:
            self._live = set(live)
            self._dirty = True
        if self._dirty and len(self._cloud_ids):
            Device._rescore(self, at_ms)
        return super().ranking(at_ms, live)


def rescore_batched(devices: Sequence[Device], at_ms: int, live: set[int] | None) -> int:
    """Re-score every dirty device in one forward pass per (shared model, zero patch) group.

    Exactly what each device's own ``_rescore`` computes (candidates are scored
    independently; padding rows are dropped), but one padded batch instead of one call
    per device: the replay's hot path. Personalized devices (non-zero patch) are scored
    alone since the patch is one vector per forward. Returns forwards run.
    """
    groups: dict[int, list[tuple[Device, Any, np.ndarray, np.ndarray]]] = {}
    forwards = 0
    for dev in devices:
        if live is not None and live != dev._live:
            dev._live = set(live)
            dev._dirty = True
        if not dev._dirty or len(dev._cloud_ids) == 0:
            continue
        if bool(torch.any(dev.patch != 0)):
            Device._rescore(dev, at_ms)
            forwards += 1
            continue
        inputs, ids, injected = dev._inputs(at_ms)
        groups.setdefault(id(dev.model), []).append((dev, inputs, ids, injected))
    for members in groups.values():
        model = members[0][0].model
        kmax = max(len(m[2]) for m in members)
        b = len(members)
        d = members[0][1].cand_emb.shape[1]
        c = members[0][1].ctx.shape[1]
        cand = np.zeros((b, kmax, d), dtype=np.float32)
        cz = np.zeros((b, kmax), dtype=np.float32)
        ctx = np.zeros((b, kmax, c), dtype=np.float32)
        seq = np.stack([m[1].seq_emb for m in members]).astype(np.float32)
        sf = np.stack([m[1].seq_feat for m in members]).astype(np.float32)
        sm = np.stack([m[1].seq_mask for m in members]).astype(np.float32)
        for i, (_, inp, ids, _) in enumerate(members):
            k = len(ids)
            cand[i, :k], cz[i, :k], ctx[i, :k] = inp.cand_emb, inp.cloud_z, inp.ctx
        with torch.inference_mode():
            out = model(*(torch.from_numpy(x) for x in (cand, cz, ctx, seq, sf, sm)), torch.zeros(model.config.patch_dim)).numpy()
        forwards += 1
        for i, (dev, _, ids, injected) in enumerate(members):
            dev._scores = out[i, : len(ids)].copy()
            dev._scored_ids = ids
            dev._injected = injected
            dev._dirty = False
            dev.rescores += 1
    return forwards


def _time_single_rescore(dev: Device, at_ms: int) -> float:
    """Seconds one unbatched on-device re-score takes (features + forward): the phone-side latency."""
    t0 = time.perf_counter()
    inputs, _, _ = dev._inputs(at_ms)
    dev.model.score_numpy(inputs, dev.patch)
    return time.perf_counter() - t0


# -- per-strategy cloud state -----------------------------------------------------
class StrategyCloud:
    """One strategy's cloud: served snapshot + overlays on the shared model (an ``AggregationTarget``).

    Args:
        reranker: the strategy's shared reranker (cloud copy; devices get it at fetches).
        data_fit_steps: gradient steps fitting the reranker's prior head on data examples.
    """

    def __init__(
        self,
        reranker: Reranker,
        data_fit_steps: int = 30,
        data_fit_lr: float = 0.05,
        data_fit_l2: float = 0.01,
        trust_radius: float | None = None,
    ) -> None:
        self.trust_radius = trust_radius
        self._anchor = reranker.flat_parameters() if trust_radius is not None else None
        self.data_fit_lr = data_fit_lr
        self.data_fit_l2 = data_fit_l2
        self.data_fit_max_step = 0.1
        self.reranker = reranker
        self.model_version = 0
        self.data_fit_steps = data_fit_steps
        self.user_vec: dict[int, np.ndarray] = {}
        self.item_delta: dict[int, np.ndarray] = {}
        self._pending_model_delta: np.ndarray | None = None
        self._examples: list[HardExamples] = []
        self.version = 0
        self.item_ids = np.zeros(0, dtype=np.int64)
        self.item_vecs = np.zeros((0, reranker.config.emb_dim), dtype=np.float32)
        self.emb_q = np.zeros((0, reranker.config.emb_dim), dtype=np.int8)
        self.emb_scale = np.zeros(0, dtype=np.float32)

    # AggregationTarget
    def apply_model_delta(self, flat_delta: np.ndarray) -> None:
        d = np.asarray(flat_delta, dtype=np.float32)
        self._pending_model_delta = d if self._pending_model_delta is None else self._pending_model_delta + d

    def apply_item_deltas(self, deltas: dict[int, np.ndarray]) -> None:
        """Accumulate device item-row deltas, each item's total kept within ``trust_radius``
        (the trust region covers item rows too: unit item vectors moved by more than that no
        longer mean what the ranking stage learned)."""
        for item, d in deltas.items():
            cur = self.item_delta.get(int(item))
            tot = np.asarray(d, dtype=np.float32) if cur is None else cur + d
            if self.trust_radius is not None:
                n = float(np.linalg.norm(tot))
                if n > self.trust_radius:
                    tot = tot * (self.trust_radius / n)
            self.item_delta[int(item)] = tot

    def set_user_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        self.user_vec.update({int(k): np.asarray(v, dtype=np.float32) for k, v in vectors.items()})

    def add_examples(self, examples: Sequence[tuple[int, HardExamples]]) -> None:
        self._examples.extend(ex for _, ex in examples)

    @property
    def overlay_empty(self) -> bool:
        return not self.user_vec and not self.item_delta

    def _fit_on_examples(self, model: Reranker) -> bool:
        """Fit the prior head's context + cloud-score weights on the round's hard examples (logistic loss)."""
        if not self._examples or self.data_fit_steps <= 0:
            return False
        x = np.concatenate([e.features for e in self._examples])
        y = np.concatenate([e.labels for e in self._examples]).astype(np.float32)
        self._examples = []
        # Engaged items that were not in the cached list carry placeholder features
        # (rank_frac = 1, injected cloud z); fitting on them teaches "low cloud score wins".
        in_list = x[:, _RANK_FRAC] < 1.0
        x, y = x[in_list], y[in_list]
        if len(np.unique(y)) < 2:
            return False
        c = model.config.ctx_dim + 1  # ctx features + cloud z (the device score is not a model input)
        # Hard examples are selected *because* the device scored them wrongly, so a plain fit
        # on them is biased (it learns "low cloud score wins"). Fit a small residual on top of
        # the device's own score instead (a boosting step), strongly pulled to zero.
        xt = torch.from_numpy(np.ascontiguousarray(x[:, :c], dtype=np.float32))
        offset = torch.from_numpy(np.ascontiguousarray(x[:, -1], dtype=np.float32))
        yt = torch.from_numpy(y)
        delta = torch.zeros(c, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.data_fit_lr)
        for _ in range(self.data_fit_steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(offset + xt @ delta, yt) + self.data_fit_l2 * (delta**2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            d = delta.detach()
            n = float(d.norm())
            if n > self.data_fit_max_step:
                d = d * (self.data_fit_max_step / n)
            model.prior.weight[0, :c] += d
        w = model.prior.weight
        model.zero_grad(set_to_none=True)
        logger.debug("data fit on %d examples: prior=%s", len(y), np.round(w.detach().numpy()[0], 3).tolist())
        return True

    def refresh(self, cloud: CloudModel) -> bool:
        """Rebuild the served snapshot; returns True when the reranker got a new version."""
        ids, vecs = cloud.item_vectors()
        vecs = np.asarray(vecs, dtype=np.float32)
        if self.item_delta and len(ids):
            vecs = vecs.copy()
            for item, d in self.item_delta.items():
                j = cloud.row_of.get(item)
                if j is not None and j < len(vecs):
                    vecs[j] += d
        self.item_ids, self.item_vecs = np.asarray(ids, dtype=np.int64), vecs
        if len(vecs):
            self.emb_q, self.emb_scale = quantize_rows(vecs)
        self.version += 1
        new_model = self._pending_model_delta is not None or bool(self._examples)
        if new_model:
            model = copy.deepcopy(self.reranker)
            if self._pending_model_delta is not None:
                model.apply_delta(self._pending_model_delta)
                self._pending_model_delta = None
            self._fit_on_examples(model)
            self._project_to_trust_region(model)
            self.reranker = model
            self.model_version = self.version
        return new_model

    def _project_to_trust_region(self, model: Reranker) -> None:
        """Keep the shipped reranker within ``trust_radius`` of the one the fleet started with.

        Why: every round's update is fitted on a biased slice (the examples devices chose to
        send, FedSGD steps on a few groups each); unbounded, their sum drifts far from what
        ranks well (measured on the whole Twitch log: federated -5%, data -27% NDCG@10 vs
        cloud-only). Projection onto an L2 ball is the server-side trust region.
        """
        if self._anchor is None or self.trust_radius is None:
            return
        drift = model.flat_parameters() - self._anchor
        n = float(np.linalg.norm(drift))
        if n > self.trust_radius:
            model.apply_delta(drift, scale=self.trust_radius / n - 1.0)

    def interest_vectors(self, users: np.ndarray) -> dict[int, np.ndarray]:
        """Row in ``users`` -> the latest uploaded interest vector of that user (feature family)."""
        if not self.user_vec:
            return {}
        out = {}
        for j, u in enumerate(users.tolist()):
            v = self.user_vec.get(int(u))
            if v is not None and float(np.linalg.norm(v)) > 0:
                out[j] = v
        return out


# -- per-strategy run state -------------------------------------------------------------
@dataclass
class _Run:
    strategy: Strategy
    cloud: StrategyCloud
    verifier: UpdateVerifier
    keyring: Keyring
    device_config: DeviceConfig
    log: PredictionLog
    devices: dict[int, Device] = field(default_factory=dict)
    cached: dict[int, np.ndarray] = field(default_factory=dict)
    pending: list[tuple[bytes, int]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    uploads: int = 0
    latencies: list[float] = field(default_factory=list)
    update_staleness: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    list_age_ms: list[int] = field(default_factory=list)
    cached_at: dict[int, int] = field(default_factory=dict)
    last_upload_n: dict[int, int] = field(default_factory=dict)
    last_personalize_n: dict[int, int] = field(default_factory=dict)
    bytes_request: int = 0

    @property
    def label(self) -> str:
        return self.strategy.label

    @property
    def uses_examples(self) -> bool:
        """Whether the strategy's devices need training groups (uploads or personalization use them)."""
        s = self.strategy
        return bool(s.personalize_steps) or bool({"parameter", "data"} & set(s.families))


def _schedule(users: np.ndarray, ts: np.ndarray, is_pos: np.ndarray, config: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fetch, sync) flags per prediction point.

    A *sync* is a user's first fetch, a new session or ``fetch_every_ms`` elapsed: the
    device also takes a new reranker, personalizes and considers fetch-time uploads. A
    *fetch* is a sync or ``refetch_every`` engagements since the last fetch (a feed asks for
    its next page): the device gets a fresh list, nothing else.
    """
    fetch = np.zeros(len(users), dtype=bool)
    sync = np.zeros(len(users), dtype=bool)
    last_ts: dict[int, int] = {}
    last_sync: dict[int, int] = {}
    since: dict[int, int] = {}
    every = config.refetch_every
    for j, (u, t, p) in enumerate(zip(users.tolist(), ts.tolist(), is_pos.tolist())):
        lt = last_ts.get(u)
        is_sync = lt is None or t - lt > config.session_gap_ms or t - last_sync.get(u, t) >= config.fetch_every_ms
        if p and (is_sync or u not in last_sync or (every > 0 and since.get(u, 0) >= every)):
            fetch[j] = True
            since[u] = 0
            if is_sync or u not in last_sync:
                sync[j] = True
                last_sync[u] = t
        if p:
            since[u] = since.get(u, 0) + 1
        last_ts[u] = t
    return fetch, sync


def _prediction_points(users: np.ndarray, ts: np.ndarray, items: np.ndarray, positive: np.ndarray, gap_ms: int) -> np.ndarray:
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


def _relevant_sets(users: np.ndarray, ts: np.ndarray, items: np.ndarray, is_pos: np.ndarray, config: EvalConfig) -> list[set[int] | None]:
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


def _window_requests(
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


def _candidates_for(sc: StrategyCloud, cloud: CloudModel, requests: list[Request], k: int) -> list[Candidates]:
    """The cloud's ranked lists for a batch of fetches, as the payload a device receives.

    The strategy's overlay is applied: its item vectors (device item deltas on top of the
    snapshot) and, for users with an uploaded interest vector, that vector as a further
    recall channel and ranking feature. A user with neither a known id nor a session gets
    the trending list, flagged ``fallback="popular"``.
    """
    users = np.array([r.user_id for r in requests], dtype=np.int64)
    vectors = sc.item_vecs if sc.item_delta else None
    ranked = cloud.recommend(requests, k, vectors=vectors, interest=sc.interest_vectors(users))
    d = sc.emb_q.shape[1]
    out = []
    for req, r in zip(requests, ranked):
        keep = r.rows < len(sc.emb_q)
        rows = r.rows[keep]
        out.append(
            Candidates(
                user_id=req.user_id,
                item_ids=r.item_ids[keep].astype(np.int64),
                scores=r.scores[keep],
                emb_q=sc.emb_q[rows] if len(rows) else np.zeros((0, d), np.int8),
                emb_scale=sc.emb_scale[rows] if len(rows) else np.zeros(0, np.float32),
                model_version=sc.version,
                computed_at_ms=int(req.at_ms),
                fallback=None if r.personalized else "popular",
            )
        )
    return out


# -- the loop ----------------------------------------------------------------------
def run_prequential(
    log: EventLog,
    strategies: Sequence[Strategy],
    config: EvalConfig | None = None,
    cloud_factory: CloudFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    reference: str = "cloud-only",
    workers: int = 1,
) -> EvaluationResult:
    """Replay ``log`` through every strategy on the same events; returns the summaries.

    Args:
        log: time-sorted event log.
        strategies: strategy instances (labels must be unique).
        config: protocol knobs.
        cloud_factory: builds the shared cloud (default: ``clouds.recommender_for``).
        progress: called as ``progress(events_done, events_total)`` after each mini-batch.
        reference: label the relative differences are computed against.
        workers: replay processes (forked; POSIX only). Strategies are split into groups
            of similar cost; each process trains its own copy of the (deterministic) cloud
            and replays its group on the same events, and the results are merged. Device
            simulation is >90% of the time and independent between strategies, so this
            divides wall time by up to ``workers`` when cores are free.
    """
    config = config or EvalConfig()
    labels = [s.label for s in strategies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"strategy labels must be unique: {labels}")
    if workers > 1 and len(strategies) > 1:
        return _run_parallel(log, strategies, config, cloud_factory, progress, reference, workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-user forwards: thread fan-out costs 5x more than it saves
    try:
        result = _run(log, strategies, config, cloud_factory, progress, reference)
    finally:
        torch.set_num_threads(threads)
    _compare(result.results, reference, config)
    return result


#: Relative replay cost of a strategy's devices (measured on the first 10k Twitch events with a
#: fetch per engagement; used only to balance workers). The first worker also runs the baselines.
_COST = {"cloud-only": 0.05, "device-rerank": 0.75, "feature": 0.85, "federated": 1.2, "data": 1.0, "hybrid": 1.7}
_BASELINES_COST = 0.3


def split_by_cost(strategies: Sequence[Strategy], workers: int) -> list[list[int]]:
    """Partition strategy indices into ``workers`` groups of similar cost (group 0 also replays
    the baselines): exhaustive for two workers and a handful of strategies, else greedy longest-first."""
    cost = [_COST.get(s.name, 1.0) for s in strategies]
    n = len(strategies)
    if workers == 2 and 1 < n <= 14:
        best: tuple[float, int] | None = None
        for mask in range(1, 2 ** (n - 1)):  # strategy n-1 always in group 0 (symmetry)
            b = sum(c for i, c in enumerate(cost) if mask >> i & 1)
            a = sum(cost) - b + _BASELINES_COST
            if best is None or max(a, b) < best[0]:
                best = (max(a, b), mask)
        assert best is not None
        g1 = [i for i in range(n) if best[1] >> i & 1]
        return [[i for i in range(n) if not best[1] >> i & 1], g1]
    order = sorted(range(len(strategies)), key=lambda i: -_COST.get(strategies[i].name, 1.0))
    groups: list[list[int]] = [[] for _ in range(min(workers, len(strategies)))]
    load = [0.0] * len(groups)
    for i in order:
        g = int(np.argmin(load))
        groups[g].append(i)
        load[g] += _COST.get(strategies[i].name, 1.0)
    return [sorted(g) for g in groups if g]


def _run_parallel(
    log: EventLog,
    strategies: Sequence[Strategy],
    config: EvalConfig,
    cloud_factory: CloudFactory | None,
    progress: Callable[[int, int], None] | None,
    reference: str,
    workers: int,
) -> EvaluationResult:
    import multiprocessing as mp
    import pickle

    t0 = time.perf_counter()
    groups = split_by_cost(strategies, workers)
    ctx = mp.get_context("fork")  # strategies hold lambdas (policy factories): inherit, do not pickle

    def work(idx: list[int], first: bool, conn: Any) -> None:
        try:
            torch.set_num_threads(1)
            res = _run(log, [strategies[i] for i in idx], config, cloud_factory, progress if first else None, reference, baselines=first)
            conn.send_bytes(pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException as exc:  # report, do not hang the parent
            conn.send_bytes(pickle.dumps(exc))
        finally:
            conn.close()

    procs, pipes = [], []
    for g, idx in enumerate(groups):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=work, args=(idx, g == 0, send), daemon=True)
        p.start()
        send.close()
        procs.append(p)
        pipes.append(recv)
    parts: list[EvaluationResult] = []
    for p, recv in zip(procs, pipes):
        obj = pickle.loads(recv.recv_bytes())
        p.join()
        if isinstance(obj, BaseException):
            raise RuntimeError("a replay worker failed") from obj
        parts.append(obj)
    by_label = {r.label: r for part in parts for r in part.results}
    results = [by_label[s.label] for s in strategies] + [r for r in parts[0].results if r.kind == "baseline"]
    _compare(results, reference, config)
    head = parts[0]
    timings = {k: float(head.timings.get(k, 0.0)) for k in ("cloud_train_s", "retrieval_s", "baselines_s")}
    timings["devices_s"] = float(sum(p.timings.get("devices_s", 0.0) for p in parts))
    timings["rounds_s"] = float(sum(p.timings.get("rounds_s", 0.0) for p in parts))
    timings["worker_replay_max_s"] = float(max(p.timings.get("replay_total_s", 0.0) for p in parts))
    timings["replay_total_s"] = time.perf_counter() - t0
    head.results = results
    head.timings = timings
    head.wall_s = timings["replay_total_s"]
    head.config = {**head.config, "workers": len(groups)}
    return head


def _run(
    log: EventLog,
    strategies: Sequence[Strategy],
    config: EvalConfig,
    cloud_factory: CloudFactory | None,
    progress: Callable[[int, int], None] | None,
    reference: str,
    baselines: bool = True,
) -> EvaluationResult:
    """One replay of ``strategies``; ``vs_reference`` is left empty (the caller compares once, on all results)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {"cloud_train_s": 0.0, "retrieval_s": 0.0, "devices_s": 0.0, "rounds_s": 0.0, "baselines_s": 0.0}
    ev = log.events
    if config.max_events is not None:
        ev = ev.iloc[: config.max_events]
    user_rows = ~np.isin(ev.kind.to_numpy(), _AVAIL)
    ev = ev[user_rows].reset_index(drop=True)
    whole = EventBatch.from_frame(ev)
    n = len(whole)
    users, ts, items, kinds, vals = whole.user_id, whole.ts_ms, whole.item_id, whole.kind, whole.value
    is_pos_raw = np.isin(kinds, _POS)
    is_pos = _prediction_points(users, ts, items, is_pos_raw, config.session_gap_ms)
    live = LiveIndex(log)
    repeat_domain = resolve_domain(config.domain, live.enabled, users, items, np.isin(kinds, _POS))
    fetch, sync = _schedule(users, ts, is_pos, config)
    relevant = _relevant_sets(users, ts, items, is_pos, config)
    logger.info("replaying %d events (%d prediction points, %d fetches), repeat_domain=%s", n, int(is_pos.sum()), int(fetch.sum()), repeat_domain)

    torch.manual_seed(config.seed)

    def live_ids(t: int) -> np.ndarray | None:
        lv = live.at(int(t))
        return None if lv is None else lv[0]

    allowed_at = live_ids if live.enabled else None
    cloud = (cloud_factory or recommender_for)(log, config, not repeat_domain, allowed_at)
    dim = cloud.dim
    base_reranker = Reranker(RerankerConfig(emb_dim=dim))
    base_device = DeviceConfig(exclude_consumed=not repeat_domain, inject_live_recall=repeat_domain, seed=config.seed)
    runs: list[_Run] = []
    for s in strategies:
        s.reset()
        keyring = Keyring(f"tandem-eval-{config.seed}-{s.label}".encode().ljust(16, b"."))
        sc = StrategyCloud(
            base_reranker, config.data_fit_steps, config.data_fit_lr, config.data_fit_l2, config.trust_radius
        )  # shared until a strategy changes it (copy on write)
        from device_rerank.encoders import ParameterEncoder

        dcfg = s.device_config(base_device)
        verifier = UpdateVerifier(
            keyring,
            max_staleness_versions=config.max_staleness_rounds,
            param_norm_bound=dcfg.parameter.send_bound(base_reranker.num_parameters(), dim),
            n_params=base_reranker.num_parameters(),
            emb_dim=dim,
        )
        runs.append(_Run(s, sc, verifier, keyring, dcfg, PredictionLog(config.ks)))

    simple = Baselines(repeat_domain, config.k, config.session_gap_ms)
    base_logs = {name: PredictionLog(config.ks) for name in simple.names} if baselines else {}
    engaged: dict[int, set[int]] = {}
    sessions: dict[int, deque[tuple[int, int]]] = {}  # what each device sends with a fetch
    session_len = cloud.config.session_len
    stream_stale_sum = 0.0
    stream_stale_n = 0
    pending_ingested: list[tuple[int, int]] = []  # (first pos, last pos) of ingested windows since refresh
    since_refresh = 0
    round_no = 0
    model_nbytes = base_reranker.int8_nbytes()

    for r in runs:
        r.cloud.refresh(cloud)

    for w0 in range(0, n, config.batch_size):
        w1 = min(n, w0 + config.batch_size)
        # ---- serve: batched retrieval for every fetch in this window (state at window start)
        t0 = time.perf_counter()
        fidx = np.flatnonzero(fetch[w0:w1]) + w0
        served: dict[int, dict[int, Candidates]] = {}
        if len(fidx):
            served_reqs = _window_requests(fidx, users, ts, items, is_pos_raw, w0, sessions, engaged, session_len, repeat_domain, allowed_at)
            by_key: dict[str, dict[int, Candidates]] = {}
            request_bytes = sum(req.session.nbytes + 16 for req in served_reqs)  # every strategy's devices send the same requests
            for ri, r in enumerate(runs):
                key = "base" if r.cloud.overlay_empty else r.label
                if key not in by_key:
                    cl = _candidates_for(r.cloud, cloud, served_reqs, config.k)
                    by_key[key] = dict(zip(fidx.tolist(), cl))
                served[ri] = by_key[key]
                r.bytes_request += request_bytes
        timings["retrieval_s"] += time.perf_counter() - t0
        if base_logs:
            simple.start_window(max(config.k * 4, 400))

        # ---- test, then learn on the device side, event by event
        for j in range(w0, w1):
            u, t, it, kd, val = int(users[j]), int(ts[j]), int(items[j]), int(kinds[j]), float(vals[j])
            lv = live.at(t)
            live_set = lv[1] if lv is not None else None
            pos = bool(is_pos[j])
            if pos:
                hist = engaged.setdefault(u, set())
                rep = it in hist
                rel = relevant[j]
            if pos and base_logs:
                tb = time.perf_counter()
                for name, ranking in simple.rankings(u, t, live_set, None if repeat_domain else hist).items():
                    base_logs[name].add(u, t, ranking, it, rep, rel)
                timings["baselines_s"] += time.perf_counter() - tb
            td = time.perf_counter()
            # phase 1: fetches (cloud calls) and uploads that go with them
            if pos and fetch[j]:
                for ri, r in enumerate(runs):
                    s = r.strategy
                    cands = served[ri][j]
                    if s.rerank:
                        dev = r.devices.get(u)
                        if dev is None:
                            dev = r.devices[u] = LazyDevice(u, r.cloud.reranker, r.device_config, r.keyring.key_for(u), r.cloud.model_version)
                            dev.record_examples = r.uses_examples
                            s.configure_device(dev)
                        if sync[j] and dev.model is not r.cloud.reranker:
                            dev.set_model(r.cloud.reranker, r.cloud.model_version)
                            r.bytes_down += model_nbytes
                        dev.receive(cands, t)
                        r.bytes_down += cands.nbytes
                        if sync[j]:  # a page fetch only refreshes the list; syncs also personalize and upload
                            if s.personalize_steps and dev.history.n - r.last_personalize_n.get(u, 0) >= config.min_new_engagements:
                                dev.personalize(s.personalize_steps)
                                r.last_personalize_n[u] = dev.history.n
                            _maybe_upload(r, dev, "fetch", t, j, config.min_new_engagements)
                    else:
                        r.cached[u] = cands.item_ids
                        r.bytes_down += int(cands.item_ids.nbytes + cands.scores.nbytes)
                    r.cached_at[u] = t
            # phase 2: one batched forward per shared model for every device that must re-score
            if pos:
                devs = [r.devices.get(u) if r.strategy.rerank else None for r in runs]
                rescore_batched([d for d in devs if d is not None], t, live_set)
                # phase 3: test (the ranking the user sees now), then learn
                for ri, r in enumerate(runs):
                    dev = devs[ri]
                    if r.strategy.rerank:
                        if dev is not None:
                            if len(r.log) % config.latency_sample_every == 0:
                                r.latencies.append(_time_single_rescore(dev, t))
                            ranking = dev.ranking(t, live_set)
                        else:
                            ranking = np.zeros(0, dtype=np.int64)
                    else:  # the cached list, filtered as any client does (live now; not consumed)
                        ranking = _client_filter(r.cached.get(u, np.zeros(0, dtype=np.int64)), live_set, None if repeat_domain else hist)
                    r.log.add(u, t, ranking[: max(config.ks)], it, rep, rel)
                    ca = r.cached_at.get(u)
                    if ca is not None:
                        r.list_age_ms.append(t - ca)
            for r in runs:
                if r.strategy.rerank:
                    dev = r.devices.get(u)
                    if dev is not None:
                        dev.observe(t, it, kd, val)
                        if pos:
                            _maybe_upload(r, dev, "engagement", t, j, config.min_new_engagements)
            timings["devices_s"] += time.perf_counter() - td
            if pos:
                engaged[u].add(it)
                if base_logs:
                    simple.learn(u, it, t)
            elif is_pos_raw[j]:
                engaged.setdefault(u, set()).add(it)
                if base_logs:
                    simple.observe(u, it, t)
            if is_pos_raw[j]:
                d = sessions.get(u)
                if d is None:
                    d = sessions[u] = deque(maxlen=session_len)
                d.append((it, t))

        # ---- the cloud ingests the window (after every prediction in it)
        t0 = time.perf_counter()
        wb = whole.take(np.arange(w0, w1))
        cloud.ingest(wb)
        if base_logs:
            pw = np.flatnonzero(is_pos_raw[w0:w1]) + w0
            simple.ingest(users[pw], items[pw], ts[pw])
        pending_ingested.append((w0, w1))
        timings["cloud_train_s"] += time.perf_counter() - t0
        since_refresh += w1 - w0

        # ---- refresh + aggregation round
        if since_refresh >= config.refresh_every or w1 == n:
            t0 = time.perf_counter()
            round_no += 1
            since_refresh = 0
            for a, b in pending_ingested:
                stream_stale_sum += float(((w1 - 1) - np.arange(a, b)).sum())
                stream_stale_n += b - a
            pending_ingested = []
            cloud.refresh()
            for r in runs:
                updates: list[DecodedUpdate] = []
                r.verifier.current_model_version = r.cloud.version
                for raw, sent_at in r.pending:
                    try:
                        updates.append(r.verifier.verify(raw))
                        r.update_staleness.append(w1 - sent_at)
                    except UpdateRejected:
                        pass
                r.pending = []
                summary = r.strategy.aggregate(round_no, updates, r.cloud)
                r.cloud.refresh(cloud)
                r.rounds.append(summary)
            timings["rounds_s"] += time.perf_counter() - t0
        if progress is not None:
            progress(w1, n)

    wall = time.perf_counter() - t_start
    timings["other_s"] = max(0.0, wall - sum(timings.values()))
    timings["replay_total_s"] = wall
    dd = device_days(users, ts)
    stream_stale = stream_stale_sum / max(stream_stale_n, 1)
    results: list[StrategyResult] = []
    for r in runs:
        results.append(
            _summarize(
                r.label,
                r.strategy.name,
                "strategy",
                r.strategy.describe(),
                r.log,
                config,
                dd,
                bytes_up=r.bytes_up,
                bytes_request=r.bytes_request,
                bytes_down=r.bytes_down,
                uploads=r.uploads,
                rejected={k: v for k, v in r.verifier.rejected.items() if v},
                latencies=np.asarray(r.latencies),
                staleness={
                    "stream_to_index_events": stream_stale,
                    "update_to_effect_events": float(np.mean(r.update_staleness)) if r.update_staleness else float("nan"),
                    "shown_list_age_min": float(np.mean(r.list_age_ms)) / 60_000 if r.list_age_ms else float("nan"),
                },
                rounds=r.rounds,
            )
        )
    for name, plog in base_logs.items():
        results.append(_summarize(name, name, "baseline", {"name": name, "description": _BASELINE_DESC[name]}, plog, config, dd))
    out = EvaluationResult(
        source=log.name,
        n_events=n,
        n_points=int(is_pos.sum()),
        n_users=int(len(np.unique(users))),
        n_items=int(len(np.unique(items))),
        device_days=dd,
        config={**dataclasses.asdict(config), "repeat_domain": repeat_domain, "cloud": type(cloud).__name__, "fusion_weights": _fusion_weights(cloud)},
        results=results,
        wall_s=wall,
        timings=timings,
        reference=reference,
    )
    logger.info("prequential replay done in %.1fs (%s)", wall, {k: round(v, 1) for k, v in timings.items()})
    return out


def _client_filter(ranking: np.ndarray, live: set[int] | None, consumed: set[int] | None) -> np.ndarray:
    """What any client does to a cached list before showing it: drop offline streams and consumed items."""
    if not len(ranking) or (live is None and not consumed):
        return ranking
    keep = [i for i in ranking.tolist() if (live is None or i in live) and (not consumed or i not in consumed)]
    return np.asarray(keep, dtype=np.int64)


def _fusion_weights(cloud: CloudModel) -> dict[str, float]:
    """The ranking stage's linear weights per feature (what it learned the channels are worth)."""
    from cloud_recsys.fusion import FEATURES

    w = cloud.fusion.linear.weight.detach().numpy()[0]
    return {f: round(float(x), 4) for f, x in zip(FEATURES, w)}


def _maybe_upload(r: _Run, dev: Device, trigger: str, t: int, j: int, min_new: int = 1) -> None:
    """Ask the strategy's policy whether to upload now; send each family that has something new.

    Parameter and data updates also need ``min_new`` engagements since the device's last
    one (a gradient over unchanged local data repeats itself; it also bounds device compute).
    """
    fams = r.strategy.families_for(trigger)
    if not fams:
        return
    pol = r.strategy.policy
    costly = [f for f in fams if f in ("parameter", "data")]
    if costly:
        last = r.last_upload_n.get(dev.device_id, 0)
        if dev.history.n - last < min_new:
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
        r.pending.append((raw, j))
        r.bytes_up += len(raw)
        r.uploads += 1
        pol.mark_sent(dev.device_id, t, interest, family=fam)
        sent_costly |= fam in costly
    if sent_costly:
        r.last_upload_n[dev.device_id] = dev.history.n


def _summarize(
    label: str,
    name: str,
    kind: str,
    describe: dict[str, Any],
    plog: PredictionLog,
    config: EvalConfig,
    dd: int,
    bytes_up: int = 0,
    bytes_down: int = 0,
    bytes_request: int = 0,
    uploads: int = 0,
    rejected: dict[str, int] | None = None,
    latencies: np.ndarray | None = None,
    staleness: dict[str, float] | None = None,
    rounds: list[dict[str, Any]] | None = None,
) -> StrategyResult:
    pts = Points(plog.user, plog.ts_ms, plog.rank, plog.repeat, plog.recall)
    vals = per_point_values(pts.rank, pts.recall, config.ks)
    metrics = bootstrap_many(vals, pts.user, config.n_boot, seed=config.seed)
    rep = pts.repeat
    rep_m = bootstrap_many({k: v[rep] for k, v in vals.items()}, pts.user[rep], config.n_boot, seed=config.seed) if rep.any() else {}
    new_m = bootstrap_many({k: v[~rep] for k, v in vals.items()}, pts.user[~rep], config.n_boot, seed=config.seed) if (~rep).any() else {}
    ends, means = time_series(pts.ts_ms, ndcg_at_k(pts.rank, 10))
    lat = latencies if latencies is not None else np.zeros(0)
    sample = (lat * 1000.0)[:: max(1, len(lat) // 5000)].tolist() if len(lat) else []
    return StrategyResult(
        label=label,
        name=name,
        kind=kind,
        describe=describe,
        n_points=len(plog),
        metrics=metrics,
        repeat_metrics=rep_m,
        new_metrics=new_m,
        repeat_share=float(rep.mean()) if len(rep) else 0.0,
        bytes_up=int(bytes_up),
        bytes_down=int(bytes_down),
        bytes_up_per_device_day=bytes_up / max(dd, 1),
        bytes_down_per_device_day=bytes_down / max(dd, 1),
        bytes_request_per_device_day=bytes_request / max(dd, 1),
        uploads=int(uploads),
        rejected=rejected or {},
        latency=latency_summary(lat) if len(lat) else {},
        latency_samples_ms=sample,
        staleness=staleness or {},
        rounds=len(rounds or []),
        round_summaries=rounds or [],
        timeseries={"ts_ms": ends.tolist(), "NDCG@10": means.tolist()},
        points=pts,
    )


def _compare(results: list[StrategyResult], reference: str, config: EvalConfig) -> None:
    """Paired relative differences (bootstrap over users) of every result vs the reference."""
    ref = next((r for r in results if r.label == reference), None)
    if ref is None or ref.points is None:
        return
    rv = per_point_values(ref.points.rank, ref.points.recall, config.ks)
    for r in results:
        if r is ref or r.points is None or len(r.points.rank) != len(ref.points.rank):
            continue
        v = per_point_values(r.points.rank, r.points.recall, config.ks)
        for m in ("NDCG@10", "HR@10", "MRR"):
            r.vs_reference[m] = paired_relative_diff(v[m], rv[m], r.points.user, config.n_boot, seed=config.seed)


def metric_table_names(config: EvalConfig | None = None) -> list[str]:
    return metric_names((config or EvalConfig()).ks)
