"""A strategy's server side: what the cloud keeps per strategy, and what devices are served.

Flower's server holds a strategy's parameters and asks the strategy to aggregate a round;
here ``StrategyCloud`` is that state (the ``AggregationTarget`` every strategy's
``aggregate`` writes to: reranker deltas, data examples, item-row deltas, interest
vectors, all within a trust region), layered on the one shared ``CloudRecommender``.
The evaluation keeps one per strategy over a shared cloud; the cloud service keeps one.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import numpy as np
import torch

from streams.candidates import Candidates, quantize_rows
from cloud_recsys.index import ItemIndex
from cloud_recsys.recommender import CloudRecommender, Request
from device_rerank.config import CTX_FEATURES, DeviceConfig
from device_rerank.encoders import HardExamples, TrialEvaluation
from device_rerank.envelope import Keyring, UpdateVerifier, make_verifier
from device_rerank.reranker import Reranker
from tandem.strategies.aggregate import trimmed_mean

logger = logging.getLogger(__name__)

_RANK_FRAC = CTX_FEATURES.index("rank_frac")


#: Every HOLDOUT_EVERY-th device batch of data examples is held out to gate the cloud fit.
HOLDOUT_EVERY = 5
#: The ship gate: a trial reranker needs this many devices' verdicts ...
TRIAL_MIN_DEVICES = 16
#: ... within this many rounds, or it is dropped (never shipped on too little evidence).
TRIAL_MAX_ROUNDS = 3
#: Share of verdicts trimmed from each side before averaging (a few lying devices cannot decide).
TRIAL_TRIM = 0.1


def _in_list_rows(batches: Sequence[HardExamples]) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the examples that were in the cached list.

    Engaged items that were not in it carry placeholder features (rank_frac = 1, injected
    cloud z); fitting on them teaches "low cloud score wins".
    """
    if not batches:
        return np.zeros((0, 1), np.float32), np.zeros(0, np.float32)
    x = np.concatenate([e.features for e in batches])
    y = np.concatenate([e.labels for e in batches]).astype(np.float32)
    keep = x[:, _RANK_FRAC] < 1.0
    return x[keep], y[keep]


def _as_tensors(x: np.ndarray, y: np.ndarray, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the prior head's inputs: ctx features + cloud z, the device's own score, labels) as tensors."""
    return (
        torch.from_numpy(np.ascontiguousarray(x[:, :c], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(x[:, -1], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
    )


class StrategyCloud:
    """One strategy's cloud: served snapshot + overlays on the shared model (an ``AggregationTarget``).

    Args:
        reranker: the strategy's shared reranker (cloud copy; devices get it at fetches).
        data_fit_steps: gradient steps fitting the reranker's prior head on data examples.
        data_fit_lr / data_fit_l2: Adam step and pull-to-previous of that fit (defaults: the
            evaluation's ``EvalConfig``, so the services run the same rule).
        trust_radius: shipped rerankers stay within this L2 distance of the initial one.
        trial_min_devices: the ship gate (Flower's evaluate round, asynchronous): a changed
            reranker is first a *trial*; devices score it against the shipped one on their
            feedback that no update carried (``Device.make_evaluation``), and it ships only
            when at least this many did within ``trial_max_rounds`` rounds and their trimmed
            mean loss difference is not positive. 0 ships every change at once (no gate).
        trial_max_rounds: rounds a trial waits for verdicts before it is dropped.
    """

    def __init__(
        self,
        reranker: Reranker,
        data_fit_steps: int = 30,
        data_fit_lr: float = 0.05,
        data_fit_l2: float = 1.0,
        trust_radius: float | None = None,
        trial_min_devices: int = TRIAL_MIN_DEVICES,
        trial_max_rounds: int = TRIAL_MAX_ROUNDS,
    ) -> None:
        self.trust_radius = trust_radius
        self.trial_min_devices = int(trial_min_devices)
        self.trial_max_rounds = int(trial_max_rounds)
        self.trial: Reranker | None = None  # the changed reranker devices are scoring
        self.trial_version = -1
        self._trial_rounds = 0
        self._verdicts: dict[int, TrialEvaluation] = {}  # device -> its latest verdict on the trial
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
        self.gate_log: list[dict[str, float | int | bool]] = []  # one entry per gated data fit
        self.trial_log: list[dict[str, float | int | bool | str]] = []  # one entry per trial decided
        self.version = 0
        self.item_ids = np.zeros(0, dtype=np.int64)
        self.item_vecs = np.zeros((0, reranker.config.emb_dim), dtype=np.float32)
        self.emb_q = np.zeros((0, reranker.config.emb_dim), dtype=np.int8)
        self.emb_scale = np.zeros(0, dtype=np.float32)
        self.index: ItemIndex | None = None  # FAISS index of the overlay (item deltas baked in at refresh)

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

    def add_evaluations(self, evaluations: Sequence[tuple[int, TrialEvaluation]]) -> None:
        """Keep each device's latest verdict on the current trial (verdicts on older trials are moot)."""
        for device, ev in evaluations:
            if self.trial is not None and ev.trial_version == self.trial_version:
                self._verdicts[int(device)] = ev

    @property
    def overlay_empty(self) -> bool:
        return not self.user_vec and not self.item_delta

    def _fit_on_examples(self, model: Reranker) -> bool:
        """Fit the prior head's context + cloud-score weights on the round's hard examples (logistic loss)."""
        batches, self._examples = self._examples, []  # consumed even when not fitted: never piles up
        if not batches or self.data_fit_steps <= 0:
            return False
        # Held-out gate: every HOLDOUT_EVERY-th device batch is kept out of the fit and the
        # fitted step ships only if it does not raise their loss (a round never makes the
        # recent traffic it did not see worse). Whole batches, so no device is on both sides.
        held = [e for i, e in enumerate(batches) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
        fit = [e for i, e in enumerate(batches) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        x, y = _in_list_rows(fit)
        if len(np.unique(y)) < 2:
            return False
        c = model.config.ctx_dim + 1  # ctx features + cloud z (the device score is not a model input)
        # Hard examples are selected *because* the device scored them wrongly, so a plain fit
        # on them is biased (it learns "low cloud score wins"). Fit a small residual on top of
        # the device's own score instead (a boosting step), strongly pulled to zero.
        xt, offset, yt = _as_tensors(x, y, c)
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
            hx, hy = _in_list_rows(held)
            if len(np.unique(hy)) == 2:
                ht, hoff, hyt = _as_tensors(hx, hy, c)
                bce = torch.nn.functional.binary_cross_entropy_with_logits
                before = float(bce(hoff + ht @ torch.zeros(c), hyt))
                after = float(bce(hoff + ht @ d, hyt))
                self.gate_log.append({"held_out": int(len(hy)), "loss_before": before, "loss_after": after, "shipped": after <= before})
                if after > before:
                    logger.debug("data fit rejected by the held-out gate (%.4f -> %.4f)", before, after)
                    return False
            model.prior.weight[0, :c] += d
        w = model.prior.weight
        model.zero_grad(set_to_none=True)
        logger.debug("data fit on %d examples: prior=%s", len(y), np.round(w.detach().numpy()[0], 3).tolist())
        return True

    def refresh(self, cloud: CloudRecommender) -> bool:
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
        # the overlay's own two-tower index, rebuilt with it (None: serve the cloud's snapshot)
        self.index = cloud.index_for(vecs) if self.item_delta and len(ids) else None
        if len(vecs):
            self.emb_q, self.emb_scale = quantize_rows(vecs)
        self.version += 1
        shipped = self._decide_trial() if self.trial is not None else False
        if self.trial is not None or (self._pending_model_delta is None and not self._examples):
            return shipped  # a trial is still being scored: later changes wait for its verdict
        model = copy.deepcopy(self.reranker)
        new_model = self._pending_model_delta is not None
        if new_model:
            model.apply_delta(self._pending_model_delta)
            self._pending_model_delta = None
        new_model |= self._fit_on_examples(model)  # False: nothing to fit, or the held-out gate said no
        if not new_model:
            return shipped
        self._project_to_trust_region(model)
        if self.trial_min_devices <= 0:
            self._ship(model)
            return True
        self.trial, self.trial_version, self._trial_rounds, self._verdicts = model, self.version, 0, {}
        return shipped

    def _ship(self, model: Reranker) -> None:
        self.reranker = model
        self.model_version = self.version

    def _decide_trial(self) -> bool:
        """Ship the trial if enough devices scored it and it is no worse on their fresh
        feedback; drop it if it is worse or the evidence did not come in time. Returns shipped."""
        assert self.trial is not None
        self._trial_rounds += 1
        n = len(self._verdicts)
        if n < self.trial_min_devices and self._trial_rounds < self.trial_max_rounds:
            return False
        diff = float("nan")
        if n >= self.trial_min_devices:
            diffs = np.array([[ev.difference] for ev in self._verdicts.values()])
            diff = float(trimmed_mean(diffs, TRIAL_TRIM)[0])
            verdict = "shipped" if diff <= 0.0 else "worse"
        else:
            verdict = "too_few_verdicts"
        self.trial_log.append({"trial": self.trial_version, "devices": n, "rounds": self._trial_rounds, "difference": diff, "verdict": verdict})
        logger.debug("trial %d: %s (%d devices, difference %.4g)", self.trial_version, verdict, n, diff)
        model, self.trial, self.trial_version, self._verdicts = self.trial, None, -1, {}
        if verdict != "shipped":
            return False
        self._ship(model)
        return True

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


def serve_candidates(sc: StrategyCloud, cloud: CloudRecommender, requests: Sequence[Request], k: int) -> list[Candidates]:
    """The cloud's ranked lists for a batch of fetches, as the payload a device receives.

    The strategy's overlay is applied: its item vectors (device item deltas on top of the
    snapshot, baked in at the last ``refresh``, searched through the overlay's own index;
    deltas aggregated since then reach serving at the next refresh) and, for users with an uploaded interest vector, that vector as a further
    recall channel and ranking feature. A user with neither a known id nor a session gets
    the trending list, flagged ``fallback="popular"``.
    """
    users = np.array([r.user_id for r in requests], dtype=np.int64)
    vectors = sc.item_vecs if sc.index is not None else None  # no deltas baked in: the snapshot itself
    ranked = cloud.recommend(requests, k, vectors=vectors, interest=sc.interest_vectors(users), index=sc.index)
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


def verifier_for(
    keyring: Keyring,
    reranker: Reranker,
    device_config: DeviceConfig,
    max_staleness_versions: int,
    previous: tuple[Keyring, ...] = (),
) -> UpdateVerifier:
    """The update contract devices of a strategy must meet (``make_verifier``: keys, the
    reranker's size and width, norm bounds, example caps) for the evaluation and the services."""
    return make_verifier(
        keyring,
        reranker.num_parameters(),
        reranker.config.emb_dim,
        device_config,
        max_staleness_versions=max_staleness_versions,
        previous=previous,
    )
