"""One user's device: cached cloud candidates, real-time reranking, local learning, updates.

The device calls the cloud only in ``fetch`` (counted in ``cloud_calls``).
Everything else - reacting to actions, ranking, personalization, building
updates - runs locally. EdgeRec-style triggers re-score the cached list at
once: an engagement, a skip/delete (or a too-short watch), or ``k_exposures``
impressions without an engagement.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol, Sequence

import numpy as np
import torch

from streams.candidates import Candidates
from device_rerank.config import DeviceConfig
from device_rerank.encoders import (
    MAX_EVAL_LOSS,
    DataEncoder,
    EncodeStats,
    EvaluationEncoder,
    FeatureEncoder,
    ParameterEncoder,
    TrialEvaluation,
    add_gaussian_noise,
    clip_l2,
    interest_vector,
)
from device_rerank.envelope import Envelope, sign
from device_rerank.features import (
    BehaviourHistory,
    DeviceAction,
    ItemCache,
    ItemStats,
    RerankInputs,
    candidate_features,
    standardize,
)
from device_rerank.personalize import ExampleBuffer, ExampleGroup, PatchJob, buffer_examples, fine_tune_patches, mean_group_losses, shared_gradient
from device_rerank.privacy import PrivacyAccountant
from device_rerank.reranker import Reranker
from streams.schema import EventKind

logger = logging.getLogger(__name__)

_INPUT_FIELDS = ("cand_emb", "cloud_z", "ctx", "seq_emb", "seq_feat", "seq_mask")

_ENGAGE = frozenset(int(k) for k in (EventKind.CLICK, EventKind.LIKE, EventKind.FOLLOW, EventKind.LIVE_ENTER, EventKind.RATE))
_DWELL = frozenset({int(EventKind.WATCH), int(EventKind.LIVE_LEAVE)})


class CandidateSource(Protocol):
    """Anything that serves candidates (the cloud's candidate HTTP API through a client, or a test fake)."""

    def candidates(self, user_id: int, k: int = 100, at_ms: int | None = None) -> Candidates: ...


class Device:
    """A simulated phone running the reranker for one user.

    Args:
        device_id: also the user id the device fetches candidates for.
        model: the shared reranker (frozen here; may be shared by many devices).
        config: runtime sizes and options.
        key: this device's HMAC key (``Keyring.key_for(device_id)``); needed by ``make_update``.
        model_version: the cloud model version the device's state refers to; updated to the
            newest of ``set_model`` broadcasts and received ``Candidates.model_version``, and
            stamped on envelopes (the verifier's staleness check).
    """

    def __init__(
        self,
        device_id: int,
        model: Reranker,
        config: DeviceConfig | None = None,
        key: bytes | None = None,
        model_version: int = 0,
    ) -> None:
        self.device_id = int(device_id)
        self.model = model
        self.config = cfg = config or DeviceConfig()
        rc = model.config
        self.key = key
        self.model_version = model_version
        self.patch = torch.zeros(rc.patch_dim)
        self.cache = ItemCache(cfg.cache_items, rc.emb_dim)
        self.history = BehaviourHistory(cfg.history_len, rc.emb_dim)
        self.stats: dict[int, ItemStats] = {}
        self.hidden: set[int] = set()
        self.buffer = ExampleBuffer(cfg.example_buffer)
        self.accountant = PrivacyAccountant(cfg.privacy)
        self.param_encoder = ParameterEncoder(cfg.parameter, model.num_parameters(), rc.emb_dim)
        self.data_encoder = DataEncoder(cfg.data)
        self.rng = np.random.default_rng([cfg.seed, self.device_id])
        self.seq = 0
        self.cloud_calls = 0
        self.rescores = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.session_steps = 0
        self.last_event_ms = -1
        self.last_update_stats: EncodeStats | None = None
        self._exposures = 0
        self._live: set[int] | None = None
        self.cands: Candidates | None = None
        self._cloud_ids = np.zeros(0, dtype=np.int64)
        self._cloud_emb = np.zeros((0, rc.emb_dim), dtype=np.float32)
        self._cloud_z = np.zeros(0, dtype=np.float32)
        self._scored_ids = np.zeros(0, dtype=np.int64)
        self._scores = np.zeros(0, dtype=np.float32)
        self._injected = np.zeros(0, dtype=bool)
        self._dirty = True
        self._now = 0
        self._cloud_set: set[int] = set()
        self._consumed: set[int] = set()
        self.record_examples = True
        self.record_trial_negatives = False  # also store uniform negatives (a fleet that scores trials)
        self._trial_rng: np.random.Generator | None = None  # their own stream: learning's draws stay the same
        self._interest: np.ndarray | None = None
        self._interest_key: tuple[int, int, int] | None = None
        self.carried_until_ms = -1  # newest feedback a parameter/data update of this device carried

    # -- cloud side --------------------------------------------------------
    def fetch(self, source: CandidateSource, k: int = 100, at_ms: int | None = None) -> int:
        """The only cloud call: fetch and cache candidates; returns bytes downloaded."""
        self.cloud_calls += 1
        cands = source.candidates(self.device_id, k, at_ms)
        self.receive(cands, at_ms)
        return cands.nbytes

    def receive(self, cands: Candidates, at_ms: int | None = None) -> None:
        """Cache a candidate list (and its embeddings); it is scored at the next trigger or ``ranking``."""
        emb_q = np.asarray(cands.emb_q)
        if emb_q.ndim != 2 or emb_q.shape[0] != len(cands.item_ids) or emb_q.shape[1] != self.model.config.emb_dim:
            raise ValueError(
                f"candidates carry embeddings of shape {emb_q.shape}, model expects (k, {self.model.config.emb_dim})"
            )
        self.cands = cands
        self.bytes_down += cands.nbytes
        self.model_version = max(self.model_version, int(cands.model_version))
        self.cache.put(cands.item_ids, cands.emb_q, cands.emb_scale)
        self._cloud_ids = np.asarray(cands.item_ids, dtype=np.int64)
        self._cloud_set = set(self._cloud_ids.tolist())
        self._consumed = set()
        self._cloud_emb = cands.embeddings()
        self._cloud_z = standardize(cands.scores)
        if at_ms is not None:
            self._now = max(self._now, int(at_ms))
        self._dirty = True  # scored lazily: on the next trigger or ranking()

    # -- on-device actions -------------------------------------------------
    def observe(self, ts_ms: int, item_id: int, kind: int, value: float = 0.0) -> bool:
        """Record an on-device action. Returns True when it changes the ranking (a trigger); the
        list is re-scored at the next ``ranking``/``scores`` call.

        ``kind`` is an ``EventKind`` or a ``DeviceAction`` (SKIP, DELETE). ``value`` is dwell
        seconds for WATCH/LIVE_LEAVE.
        """
        cfg = self.config
        ts_ms, item_id, kind = int(ts_ms), int(item_id), int(kind)
        if self.last_event_ms >= 0 and ts_ms - self.last_event_ms > cfg.session_gap_ms:
            self.session_steps = 0
        self.last_event_ms = max(self.last_event_ms, ts_ms)
        self._now = ts_ms
        if kind in (int(EventKind.STREAM_LIVE), int(EventKind.STREAM_OFFLINE)):
            return False
        st = self.stats.get(item_id)
        if st is None:
            if len(self.stats) >= 4 * cfg.cache_items:
                self._prune_stats()
            st = self.stats[item_id] = ItemStats()
        if item_id in self._cloud_set:
            self._consumed.add(item_id)
        trigger = False
        if kind == int(EventKind.IMPRESSION):
            st.impressions += 1
            self._exposures += 1
            if self._exposures >= cfg.k_exposures:
                self._exposures = 0
                trigger = True
        elif kind in _ENGAGE:
            self._engage(ts_ms, item_id, kind, 0.0, st)
            trigger = True
        elif kind in _DWELL:
            dwell = max(float(value), 0.0)
            j = self.history.last_index_of(item_id)
            if j is not None:
                self.history.set_dwell(j, dwell)
                st.last_dwell = dwell
            elif dwell >= cfg.skip_dwell_s:
                self._engage(ts_ms, item_id, kind, dwell, st)
            if dwell < cfg.skip_dwell_s:
                st.neg += 1
            trigger = True
        elif kind == int(DeviceAction.SKIP):
            st.neg += 1
            trigger = True
        elif kind == int(DeviceAction.DELETE):
            st.neg += 1
            self.hidden.add(item_id)
            trigger = True
        if trigger:
            self._dirty = True  # re-scored lazily: two triggers before anyone looks cost one forward
        return trigger

    def observe_row(self, row: tuple) -> bool:
        """``observe`` for an ``EventBatch`` row ``(event_id, ts_ms, user_id, item_id, value, kind)``."""
        _, ts, _, item, value, kind = row
        return self.observe(int(ts), int(item), int(kind), float(value))

    def _engage(self, ts_ms: int, item_id: int, kind: int, dwell: float, st: ItemStats) -> None:
        emb = self.cache.get(item_id)
        if emb is not None:
            self._record_example(ts_ms, item_id, emb)
        self.history.append(item_id, ts_ms, dwell, kind, emb)
        st.count += 1
        st.last_ts = ts_ms
        st.last_dwell = dwell
        self._exposures = 0

    def _record_example(self, ts_ms: int, item_id: int, emb: np.ndarray) -> None:
        """Snapshot (positive + shown-not-engaged negatives) with pre-engagement features.

        Only an engagement with an item of the cached list makes a group: an item outside it
        would carry placeholder features (rank_frac = 1, cloud z = ``inject_cloud_z``) that no
        negative ever has, and every learner (patch, FedSGD, data fit) then learns "rank the
        bottom of the cloud list first" (measured: NDCG@10 0.44 -> 0.09 on Twitch).
        ``record_examples`` False skips groups entirely (strategies that never use them).
        """
        cfg = self.config
        ids = self._cloud_ids
        if not self.record_examples or len(ids) < 2 or item_id not in self._cloud_set:
            return
        pos_idx = np.flatnonzero(ids == item_id)
        pool = []
        for i, it in enumerate(ids.tolist()):
            if it == item_id:
                continue
            st = self.stats.get(it)
            if st is None or st.count == 0:
                pool.append((0 if st is not None and st.impressions else 1, i))
        if not pool:
            return
        pool.sort(key=lambda t: t[0])  # shown-not-engaged first
        n_shown = sum(1 for t in pool if t[0] == 0)
        take_from = pool[: max(n_shown, cfg.negatives_per_group)]
        pick = self.rng.choice(len(take_from), size=min(cfg.negatives_per_group, len(take_from)), replace=False)
        neg = np.array([take_from[j][1] for j in pick], dtype=np.int64)
        k = len(ids)
        pos_z = float(self._cloud_z[pos_idx[0]]) if len(pos_idx) else cfg.inject_cloud_z
        pos_rank = float(pos_idx[0]) / k if len(pos_idx) else 1.0
        n_train = 1 + len(neg)
        if self.record_trial_negatives and cfg.trial_negatives_per_group > 0:
            if self._trial_rng is None:
                self._trial_rng = np.random.default_rng([cfg.seed, self.device_id, 1])
            others = np.flatnonzero(ids != item_id)
            uni = self._trial_rng.choice(others, size=min(cfg.trial_negatives_per_group, len(others)), replace=False)
            neg = np.concatenate([neg, np.sort(uni)])
        item_ids = np.concatenate([[item_id], ids[neg]])
        rank = np.concatenate([[pos_rank], neg / k]).astype(np.float32)
        ctx = candidate_features(item_ids, rank, self.stats, self._live, ts_ms, cfg)
        seq_emb, seq_feat, seq_mask = self.history.sequence(ts_ms, self.model.config.seq_len, cfg.recency_horizon_s)
        self.buffer.add(
            ExampleGroup(
                item_ids=item_ids.astype(np.int64),
                cand_emb=np.concatenate([emb[None], self._cloud_emb[neg]]).astype(np.float16),
                cloud_z=np.concatenate([[pos_z], self._cloud_z[neg]]).astype(np.float32),
                ctx=ctx,
                seq_emb=seq_emb.astype(np.float16),
                seq_feat=seq_feat,
                seq_mask=seq_mask,
                ts_ms=ts_ms,
                n_train=n_train if len(neg) + 1 > n_train else -1,
            )
        )

    def _prune_stats(self) -> None:
        """Bound memory: keep counters only for cached candidates, the history window and hidden items."""
        keep = set(self._cloud_ids.tolist()) | set(self.history.item[self.history.order()].tolist()) | self.hidden
        self.stats = {k: v for k, v in self.stats.items() if k in keep}

    # -- scoring -----------------------------------------------------------
    def _inputs(self, at_ms: int) -> tuple[RerankInputs, np.ndarray, np.ndarray]:
        cfg = self.config
        ids, emb, cz = self._cloud_ids, self._cloud_emb, self._cloud_z
        k = len(ids)
        rank = np.arange(k, dtype=np.float32) / max(k, 1)
        injected = np.zeros(k, dtype=bool)
        if cfg.inject_live_recall and self._live is not None and len(self.history):
            in_list = set(ids.tolist())
            extra_ids, extra_emb = [], []
            for it in self.history.recent_items(cfg.max_injected * 3):
                if it in in_list or it in self.hidden or it not in self._live:
                    continue
                e = self.cache.get(it)
                if e is None:  # never in a list while live: no cloud vector, the similarity terms stay 0
                    e = np.zeros(self.model.config.emb_dim, dtype=np.float32)
                extra_ids.append(it)
                extra_emb.append(e)
                if len(extra_ids) >= cfg.max_injected:
                    break
            if extra_ids:
                ids = np.concatenate([ids, np.asarray(extra_ids, dtype=np.int64)])
                emb = np.concatenate([emb, np.stack(extra_emb)])
                cz = np.concatenate([cz, np.full(len(extra_ids), cfg.inject_cloud_z, dtype=np.float32)])
                rank = np.concatenate([rank, np.ones(len(extra_ids), dtype=np.float32)])
                injected = np.concatenate([injected, np.ones(len(extra_ids), dtype=bool)])
        ctx = candidate_features(ids, rank, self.stats, self._live, at_ms, cfg)
        seq_emb, seq_feat, seq_mask = self.history.sequence(at_ms, self.model.config.seq_len, cfg.recency_horizon_s)
        return RerankInputs(emb, cz, ctx, seq_emb, seq_feat, seq_mask), ids, injected

    def _rescore(self, at_ms: int) -> None:
        if len(self._cloud_ids) == 0:
            return
        inputs, ids, injected = self._inputs(at_ms)
        self._set_scores(self.model.score_numpy(inputs, self.patch), ids, injected)

    def _set_scores(self, scores: np.ndarray, ids: np.ndarray, injected: np.ndarray) -> None:
        self._scores = scores
        self._scored_ids = ids
        self._injected = injected
        self._dirty = False
        self.rescores += 1

    def set_live(self, live: set[int] | None) -> None:
        """Availability view used by the ``is_live`` feature and recall injection (may be shared, read-only)."""
        if live is not self._live:
            self._live = live
            self._dirty = True

    def scores(self) -> dict[int, float]:
        """Current score per scored item (for inspection and tests)."""
        if self._dirty:
            self._rescore(self._now)
        return dict(zip(self._scored_ids.tolist(), self._scores.tolist()))

    def ranking(self, at_ms: int, live: set[int] | None = None) -> np.ndarray:
        """Item ids best first, from the cached list (no cloud call).

        Args:
            at_ms: now.
            live: items live now; when given, the list is filtered to them and recently
                engaged live items absent from the cloud list may be injected
                (``DeviceConfig.inject_live_recall``).
        """
        if live is not None and live != self._live:
            self._live = set(live)
            self._dirty = True
        if self._dirty:
            self._rescore(at_ms)
        if len(self._scored_ids) == 0:
            return np.zeros(0, dtype=np.int64)
        keep = np.ones(len(self._scored_ids), dtype=bool)
        if live is not None:
            keep &= np.fromiter((i in live for i in self._scored_ids.tolist()), dtype=bool, count=len(keep))
        else:
            keep &= ~self._injected
        if self.config.hide_deleted and self.hidden:
            keep &= ~np.isin(self._scored_ids, list(self.hidden))
        if self.config.exclude_consumed:
            keep &= np.fromiter(
                ((self.stats.get(i) is None or self.stats[i].count == 0) for i in self._scored_ids.tolist()), dtype=bool, count=len(keep)
            )
        idx = np.flatnonzero(keep)
        return self._scored_ids[idx[np.argsort(-self._scores[idx], kind="stable")]]

    def remaining(self) -> int:
        """Cached cloud candidates not yet shown or engaged (fetch when this runs low)."""
        return len(self._cloud_set) - len(self._consumed)

    # -- local learning ----------------------------------------------------
    def personalize(self, steps: int) -> float:
        """Fine-tune the per-user patch within this session's step budget; returns the last loss."""
        return personalize_devices([self], steps)[0]

    def interest(self, at_ms: int | None = None) -> np.ndarray | None:
        """Dwell/recency-weighted mean of engaged item embeddings (None before any engagement).

        Kept for the last (history version, time) asked: an engagement asks twice (the upload
        policy, then the update itself).
        """
        now = self._now if at_ms is None else at_ms
        key = (id(self.history), self.history.version, now)
        if key != self._interest_key:
            self._interest, self._interest_key = self._interest_at(now), key
        return None if self._interest is None else self._interest.copy()

    def _interest_at(self, now: int) -> np.ndarray | None:
        h = self.history
        idx = h.order()
        idx = idx[h.has_emb[idx]]
        if len(idx) == 0:
            return None
        age_s = np.maximum(now - h.ts[idx], 0) / 1000.0
        return interest_vector(h.emb[idx], h.dwell[idx], age_s, self.config.interest_half_life_s)

    # -- updates -----------------------------------------------------------
    def make_update(self, family: str, at_ms: int | None = None) -> Envelope | None:
        """Build a signed update of ``family`` ("feature" | "parameter" | "data").

        Returns None when there is nothing to send, no consent (data), or the privacy
        budget would be exceeded (parameter with noise). Unknown families raise ValueError.
        """
        if self.key is None:
            raise ValueError("device has no signing key")
        now = self._now if at_ms is None else int(at_ms)
        if family == "feature":
            vec = self.interest(now)
            if vec is None:
                return None
            fc = self.config.feature
            if fc.noise_multiplier > 0:
                if not self.accountant.can_release(fc.noise_multiplier):
                    logger.info("device %d: privacy budget exhausted, not sending features", self.device_id)
                    return None
                vec = add_gaussian_noise(clip_l2(vec, fc.clip_norm), fc.noise_multiplier * fc.clip_norm, self.rng)
                self.accountant.spend(fc.noise_multiplier)
            payload, n = FeatureEncoder.encode(vec), len(self.history)
        elif family == "parameter":
            if len(self.buffer) == 0:
                return None
            z = self.config.parameter.noise_multiplier
            if z > 0 and not self.accountant.can_release(z):
                logger.info("device %d: privacy budget exhausted (epsilon=%.2f), not sending", self.device_id, self.accountant.epsilon())
                return None
            grad, row_grads, _ = shared_gradient(self.model, self.buffer, self.patch)
            lr = self.config.parameter.local_lr
            rows = {i: -lr * g for i, g in row_grads.items()}
            payload, stats = self.param_encoder.encode(-lr * grad, rows, self.rng)
            if z > 0:
                self.accountant.spend(z)
            self.last_update_stats = stats
            n = len(self.buffer)
        elif family == "data":
            if not self.config.data.consent or len(self.buffer) == 0:
                return None
            ex, scores = buffer_examples(self.model, self.buffer, self.patch)
            chosen = self.data_encoder.select(ex, scores, self.rng)
            if chosen is None:
                return None
            payload, n = DataEncoder.encode(chosen), len(chosen)
        else:
            raise ValueError(f"unknown update family {family!r} (evaluations: make_evaluation)")
        if family in ("parameter", "data"):
            self.carried_until_ms = max(self.carried_until_ms, now)
        return self._sign(family, now, n, payload)

    def make_evaluation(self, trial: Reranker, trial_version: int, at_ms: int | None = None, max_groups: int = 8) -> Envelope | None:
        """Score a trial reranker against the one this device runs (Flower's client ``evaluate``).

        On the newest ``max_groups`` engagements that no parameter or data update of this
        device carried (so nothing the trial was fitted on), under this device's patch.
        Returns None when there are none.
        """
        if self.key is None:
            raise ValueError("device has no signing key")
        now = self._now if at_ms is None else int(at_ms)
        groups = self.buffer.groups
        fresh = [i for i in range(len(groups) - 1, -1, -1) if groups[i].ts_ms > self.carried_until_ms][:max_groups]
        if not fresh:
            return None
        shipped, tried = mean_group_losses((self.model, trial), self.buffer, fresh[::-1], self.patch)
        ev = TrialEvaluation(int(trial_version), len(fresh), min(shipped, MAX_EVAL_LOSS), min(tried, MAX_EVAL_LOSS))
        return self._sign("evaluation", now, len(fresh), EvaluationEncoder.encode(ev))

    def _sign(self, family: str, now: int, n: int, payload: bytes) -> Envelope:
        assert self.key is not None
        self.seq += 1
        env = sign(
            self.key,
            device_id=self.device_id,
            model_version=self.model_version,
            seq=self.seq,
            family=family,
            created_ms=max(now, 0),
            num_examples=n,
            payload=payload,
        )
        self.bytes_up += env.nbytes
        return env

    def set_model(self, model: Reranker, model_version: int) -> None:
        """Swap in a refreshed shared model (the patch is kept; it is small and user-specific)."""
        self.model = model
        self.model_version = model_version
        self._dirty = True


#: Lists shorter than this are scored alone: with one or two rows the linear layers take
#: another kernel, whose rounding differs from the batched one.
_MIN_BATCH_K = 4


def rescore_devices(requests: Sequence[tuple[Device, int, set[int] | None]]) -> int:
    """Re-score every dirty device of ``(device, now_ms, live)`` requests, batched across devices.

    Each device gets exactly the scores its own ``ranking(now_ms, live)`` would compute
    (same features, same float operations; ``Reranker.score_rows`` keeps the rounding of a
    row independent of its batch), but devices sharing a shared model and a list length
    run one forward pass, each under its own patch. A device must appear at most once.
    Returns forwards run.
    """
    groups: dict[tuple[int, int], list[tuple[Device, RerankInputs, np.ndarray, np.ndarray]]] = {}
    forwards = 0
    for dev, at_ms, live in requests:
        if live is not None and live != dev._live:
            dev._live = set(live)
            dev._dirty = True
        if not dev._dirty or len(dev._cloud_ids) == 0:
            continue
        inputs, ids, injected = dev._inputs(int(at_ms))
        if len(ids) < _MIN_BATCH_K:
            dev._set_scores(dev.model.score_numpy(inputs, dev.patch), ids, injected)
            forwards += 1
            continue
        groups.setdefault((id(dev.model), len(ids)), []).append((dev, inputs, ids, injected))
    for members in groups.values():
        model = members[0][0].model
        arrays = [np.stack([getattr(m[1], f) for m in members]).astype(np.float32, copy=False) for f in _INPUT_FIELDS]
        with torch.inference_mode():
            e = model.encode(*(torch.from_numpy(x) for x in arrays))
            rows = model.score_rows(e, torch.stack([m[0].patch for m in members]))
        forwards += 1
        for (dev, _, ids, injected), s in zip(members, rows):
            dev._set_scores(s.numpy(), ids, injected)
    return forwards


def personalize_devices(devices: Sequence[Device], steps: int) -> list[float]:
    """``Device.personalize(steps)`` for many devices (each at most once), their patch
    fine-tuning batched (``fine_tune_patches``); returns each device's last loss."""
    losses = [float("nan")] * len(devices)
    jobs: list[PatchJob] = []
    owners: list[tuple[int, int]] = []
    for i, dev in enumerate(devices):
        budget = dev.config.personalize.max_steps_per_session - dev.session_steps
        n = max(0, min(int(steps), budget))
        if n == 0 or len(dev.buffer) == 0:
            continue
        jobs.append(PatchJob(dev.model, dev.buffer, dev.patch, dev.config.personalize, n, dev.rng))
        owners.append((i, n))
    for (i, n), (patch, loss) in zip(owners, fine_tune_patches(jobs)):
        dev = devices[i]
        dev.session_steps += n
        if patch is not dev.patch:  # the holdout gate may keep the old patch: nothing to re-score
            dev.patch = patch
            dev._dirty = True
        losses[i] = loss
    return losses


def time_single_rescore(dev: Device, at_ms: int) -> float:
    """Seconds one unbatched on-device re-score takes (features + forward): the phone-side latency."""
    t0 = time.perf_counter()
    inputs, _, _ = dev._inputs(at_ms)
    dev.model.score_numpy(inputs, dev.patch)
    return time.perf_counter() - t0
