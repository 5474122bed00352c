"""The cloud recommender: recall channels merged, then ranked by a model trained on the stream.

One model, used by the evaluation and the services alike. Channels:

* two-tower ANN (``OnlineTrainer``, TorchRec): the query is computed from the request's
  session (the device's recent items travel with the fetch), so a user the cloud has never
  seen gets session-based candidates instead of the popularity list; the items are searched
  in a FAISS ``ItemIndex`` (flat for small catalogues, IVF above ``IndexConfig.auto_ivf_min``)
  rebuilt and swapped at each ``refresh``;
* item-to-item co-occurrence after (and before) the session's recent items (``ItemToItem``);
* session neighbours: items of past sessions of other users like this one (``SessionKNN``,
  V-SkNN);
* trending: time-decayed popularity (``DecayedCounts``), three half-lives as features;
* repeats: the session's own items, with LiveRec's REP count and time-since-last features.

The union is scored by ``FusionRanker`` (cloud_recsys/fusion.py). Everything works in the
recommender's own dense item rows (assigned on first sight).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.cooccurrence import ItemToItem, recent_distinct
from cloud_recsys.fusion import FEATURES, N_FEATURES, FusionConfig, FusionRanker
from cloud_recsys.index import IndexConfig, ItemIndex
from cloud_recsys.popularity import decay_weights
from cloud_recsys.session_knn import SessionKNN
from streams.candidates import top_indices
from cloud_recsys.trainer import OnlineTrainer
from streams.batch import EventBatch
from streams.schema import POSITIVE_KINDS

logger = logging.getLogger(__name__)

_POS = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)
_F = {name: j for j, name in enumerate(FEATURES)}
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Session:
    """What a device sends with a fetch: its recent engaged item ids and their times, oldest first."""

    item_ids: np.ndarray
    ts_ms: np.ndarray

    @staticmethod
    def empty() -> "Session":
        return Session(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @staticmethod
    def from_pairs(pairs: Sequence[tuple[int, int]]) -> "Session":
        """From (item id, time) pairs, oldest first (a device's or the cloud's recent-items deque)."""
        n = len(pairs)
        return Session(np.fromiter((i for i, _ in pairs), np.int64, n), np.fromiter((t for _, t in pairs), np.int64, n))

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: 8 per id plus a 4-byte time offset each."""
        return 12 * len(self.item_ids)


@dataclass(frozen=True)
class Request:
    """One fetch: who, when, the device's session, and what may be shown.

    Args:
        user_id: raw user id.
        at_ms: log time of the fetch.
        session: the device's recent items.
        allowed: raw ids that may be returned (items live now); None = all.
        exclude: raw ids that must not be returned (consumed items in a feed); None = none.
    """

    user_id: int
    at_ms: int
    session: Session
    allowed: np.ndarray | None = None
    exclude: set[int] | None = None


@dataclass(frozen=True)
class Ranked:
    """A ranked candidate list: raw ids, fused scores and recommender rows, best first."""

    item_ids: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    personalized: bool


@dataclass(frozen=True)
class RecommenderConfig:
    """Sizes of the channels and the ranking stage.

    Args:
        two_tower_k / i2i_k / sknn_k / trending_k: candidates each channel contributes per request.
        session_len: recent items a device sends (REP counts the last 16 of them).
        i2i_window: positives each new positive is paired with (co-occurrence).
        session_gap_ms: inactivity that ends a session (co-occurrence pairs within it only).
        train_lists: fetches simulated per ingested mini-batch to train the ranking stage.
        fusion: the ranking model.
        two_tower: the TorchRec two-tower (sizes; ``user_id_dropout`` lets the session carry
            the query for cold users).
        max_session_users: users whose recent items (and, in feeds, consumed items) the cloud
            keeps for requests without a session; the least recently active are forgotten
            beyond it (memory stays bounded on an endless stream of new users).
        seed: sampling seed.
    """

    two_tower_k: int = 100
    i2i_k: int = 60
    sknn_k: int = 60
    trending_k: int = 40
    session_len: int = 32
    i2i_window: int = 3
    session_gap_ms: int = 30 * 60_000
    train_lists: int = 256
    max_session_users: int = 1_000_000
    fusion: FusionConfig = field(default_factory=FusionConfig)
    two_tower: TwoTowerConfig = field(default_factory=lambda: TwoTowerConfig(user_id_dropout=0.3))
    seed: int = 0


class DecayedCounts:
    """Dense exponentially decayed counts per row (``half_life_ms=None``: plain counts)."""

    def __init__(self, half_life_ms: float | None) -> None:
        self.half_life_ms = half_life_ms
        self.values = np.zeros(0, np.float64)
        self.t_ref: int | None = None

    def add(self, rows: np.ndarray, ts_ms: np.ndarray, n_rows: int) -> None:
        if n_rows > len(self.values):
            self.values = np.concatenate([self.values, np.zeros(n_rows - len(self.values) + 1024)])
        if len(rows) == 0:
            return
        w, self.t_ref, factor = decay_weights(ts_ms, self.half_life_ms, self.t_ref)
        if factor != 1.0:
            self.values *= factor
        np.add.at(self.values, rows, w)

    def log_relative(self, n_rows: int) -> np.ndarray:
        """log((count + eps) / (max + eps)) per row: scale-free, 0 for the top item."""
        v = self.values[:n_rows]
        top = float(v.max()) if len(v) else 0.0
        eps = max(top, 1e-300) * 1e-4 + 1e-300
        return np.log((v + eps) / (top + eps)).astype(np.float32)


class CloudRecommender:
    """The cloud model: ingest the stream, refresh the served snapshot, answer fetches.

    Args:
        config: channel and model sizes.
        exclude_consumed: never return an item the user already consumed (feeds without
            repeats); the cloud remembers what it ingested per user.
        item_categories: raw item -> category (two-tower side feature).
        allowed_at: items that may be shown at a time (livestream availability), or None.
        index_config: the two-tower channel's FAISS index (default ``TWO_TOWER_INDEX``: exact
            ``flat`` below 50,000 items, IVF above).
    """

    def __init__(
        self,
        config: RecommenderConfig | None = None,
        exclude_consumed: bool = False,
        item_categories: dict[int, int] | None = None,
        allowed_at: Callable[[int], np.ndarray | None] | None = None,
        index_config: IndexConfig | None = None,
    ) -> None:
        self.config = cfg = config or RecommenderConfig()
        self.exclude_consumed = exclude_consumed
        self.allowed_at = allowed_at
        self.trainer = OnlineTrainer(cfg.two_tower, item_categories=item_categories)
        self.i2i = ItemToItem(cfg.i2i_window, cfg.session_gap_ms)
        self.sknn = SessionKNN(session_gap_ms=cfg.session_gap_ms)
        self.pops = (DecayedCounts(DAY_MS), DecayedCounts(7 * DAY_MS), DecayedCounts(None))
        self.fusion = FusionRanker(cfg.fusion)
        self.row_of: dict[int, int] = {}
        self.raw: list[int] = []
        self.vectors = np.zeros((0, self.dim), np.float32)
        self.has_vector = np.zeros(0, bool)
        self.index_config = index_config or TWO_TOWER_INDEX
        self.index = ItemIndex(self.dim, self.index_config)  # ids: recommender rows with a vector
        self.sessions: OrderedDict[int, deque[tuple[int, int]]] = OrderedDict()  # least recently active first
        self.consumed: dict[int, set[int]] = {}
        self.rng = np.random.default_rng(cfg.seed)
        self.version = 0
        self.fusion_loss = float("nan")

    @property
    def dim(self) -> int:
        return int(self.config.two_tower.out_dim)

    @property
    def n_rows(self) -> int:
        return len(self.raw)

    def _rows(self, raw: np.ndarray, add: bool = False) -> np.ndarray:
        if not add:
            return self._find_rows(raw)
        out = np.empty(len(raw), np.int64)
        for j, r in enumerate(np.asarray(raw).tolist()):
            row = self.row_of.get(r)
            if row is None:
                if not add:
                    out[j] = -1
                    continue
                row = self.row_of[r] = len(self.raw)
                self.raw.append(r)
            out[j] = row
        return out

    def _find_rows(self, raw: np.ndarray) -> np.ndarray:
        """Rows of raw ids, -1 where unknown: a binary search in the sorted raw ids (kept until
        a row is added) instead of a dict lookup per id."""
        raw = np.asarray(raw)
        if raw.dtype.kind not in "iu":  # not integers: the dict decides, as ever
            return np.fromiter((self.row_of.get(r, -1) for r in raw.tolist()), np.int64, len(raw))
        n = len(self.raw)
        if getattr(self, "_map_n", -1) != n:
            keys = np.asarray(self.raw, np.int64)
            order = np.argsort(keys, kind="stable")
            self._map_keys, self._map_rows, self._map_n = keys[order], order.astype(np.int64), n
        keys = self._map_keys
        if len(raw) == 0 or len(keys) == 0:
            return np.full(len(raw), -1, np.int64)
        q = raw.astype(np.int64)
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[pos] == q, self._map_rows[pos], -1)

    def raw_ids(self, rows: np.ndarray) -> np.ndarray:
        """Raw item ids of recommender rows."""
        return np.asarray(self.raw, np.int64)[np.asarray(rows, np.int64)]

    def knows_user(self, user_id: int) -> bool:
        return int(user_id) in self.sessions

    def session_of(self, user_id: int) -> Session:
        """The cloud's own copy of a user's recent items (what a device of that user would send)."""
        return Session.from_pairs(self.sessions.get(int(user_id), ()))

    # -- pickling ---------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything but the trainer's lock and the availability callback: the trainer travels
        as its ``state_dict`` (it checks its config on load), ``allowed_at`` is the owner's to set
        again (the evaluation's live view, the service's availability table)."""
        state = self.__dict__.copy()
        state["trainer"] = self.trainer.state_dict()
        state["allowed_at"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        trainer_state = state.pop("trainer")
        if not isinstance(trainer_state, dict):  # written before the recommender pickled its trainer
            raise ValueError("a cloud recommender saved without its trainer state (an older checkpoint format): retrain or start fresh")
        self.__dict__.update(state)
        self.sessions = OrderedDict(self.sessions)  # a plain dict before sessions were bounded
        self.trainer = OnlineTrainer(self.config.two_tower)
        self.trainer.load_state_dict(trainer_state)

    # -- learning ---------------------------------------------------------------------
    def ingest(self, batch: EventBatch) -> dict[str, float]:
        """Learn from a time-ordered mini-batch, after every prediction inside it was made.

        First the ranking stage learns from fetches simulated at sampled events (with the
        state before the batch, as served), then the channels count the batch and the
        two-tower trains on it.
        """
        pos = np.isin(batch.kind, _POS) & (batch.user_id >= 0)
        if not pos.any():
            return {"n": 0}
        users, items, ts = batch.user_id[pos], batch.item_id[pos], batch.ts_ms[pos]
        rows = self._rows(items, add=True)
        n = len(users)
        pick = set(self.rng.choice(n, size=min(n, self.config.train_lists), replace=False).tolist()) if self.version else set()
        reqs: list[Request] = []
        targets: list[int] = []
        L = self.config.session_len
        for j, (u, i, t) in enumerate(zip(users.tolist(), items.tolist(), ts.tolist())):
            d = self.sessions.get(u)
            if j in pick and not (d and d[-1][0] == i and t - d[-1][1] <= self.config.session_gap_ms):
                # (a positive on the item just consumed continues it; it is no new choice to learn)
                sess = Session.from_pairs(d or ())
                allowed = self.allowed_at(t) if self.allowed_at is not None else None
                done = self.consumed.get(u) if self.exclude_consumed else None
                reqs.append(Request(u, t, sess, allowed, set(done) if done else None))  # a copy: the loop adds to it
                targets.append(i)
            if d is None:
                d = self.sessions[u] = deque(maxlen=L)
            else:
                self.sessions.move_to_end(u)
            d.append((i, t))
            if self.exclude_consumed:
                self.consumed.setdefault(u, set()).add(i)
        while len(self.sessions) > self.config.max_session_users:
            old_user, _ = self.sessions.popitem(last=False)
            self.consumed.pop(old_user, None)
        if reqs:
            lists, tgt = [], []
            for (feats, ids, _, _), target in zip(self._candidates(reqs, self.vectors, None), targets):
                hit = np.flatnonzero(ids == target)
                if len(hit):
                    lists.append(feats)
                    tgt.append(int(hit[0]))
            if lists:
                self.fusion_loss = self.fusion.learn(lists, tgt)
        self.i2i.update(users, items, ts)
        self.sknn.update(users, items, ts)
        for p in self.pops:
            p.add(rows, ts, self.n_rows)
        out = self.trainer.train_batch(batch)
        return {"n": int(n), "fusion_loss": self.fusion_loss, **{k: v for k, v in out.items() if k != "n"}}

    # -- snapshot ---------------------------------------------------------------------
    def refresh(self) -> int:
        """Re-export the two-tower's item vectors into the served snapshot and its FAISS index
        (built aside, then swapped in); returns the new version."""
        ids, vecs = self.trainer.item_vectors()
        rows = self._rows(np.asarray(ids, np.int64), add=True)
        self.vectors = np.zeros((self.n_rows, self.dim), np.float32)
        self.has_vector = np.zeros(self.n_rows, bool)
        self.vectors[rows] = vecs
        self.has_vector[rows] = True
        self.index.swap(self.index_for(self.vectors, self.has_vector))
        self.version += 1
        self.trainer.version = self.version
        return self.version

    def index_for(self, vectors: np.ndarray, has: np.ndarray | None = None) -> ItemIndex:
        """A FAISS index over item vectors by row (a snapshot, or a strategy's overlay), with
        this cloud's ``IndexConfig``; ids are the rows with a vector (``has``; default: the
        rows with a non-zero vector)."""
        vectors = np.asarray(vectors, np.float32)
        rows = np.flatnonzero(np.linalg.norm(vectors, axis=1) > 0 if has is None else has)
        index = ItemIndex(self.dim, self.index_config)
        index.build(rows, vectors[rows])
        return index

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(raw ids, vectors) of the snapshot, in recommender row order."""
        return np.asarray(self.raw[: len(self.vectors)], np.int64), self.vectors

    # -- serving ----------------------------------------------------------------------
    def recommend(
        self,
        requests: Sequence[Request],
        k: int,
        vectors: np.ndarray | None = None,
        interest: dict[int, np.ndarray] | None = None,
        index: ItemIndex | None = None,
    ) -> list[Ranked]:
        """Ranked lists for a batch of fetches.

        Args:
            requests: the fetches.
            k: list length.
            vectors: item vectors by row to use instead of the snapshot (a strategy's
                overlay: device item deltas applied on top).
            interest: request index -> uploaded interest vector (a further recall channel
                and feature; feature-based collaboration).
            index: the FAISS index over ``vectors`` (``index_for(vectors)``, kept by the
                strategy between refreshes); None: the snapshot's, or one built for
                ``vectors`` on this call.
        """
        vec = self.vectors if vectors is None else vectors
        out: list[Ranked] = []
        for req, (feats, ids, rows, personalized) in zip(requests, self._candidates(requests, vec, interest, index)):
            if len(ids) == 0:
                out.append(Ranked(ids, np.zeros(0, np.float32), rows, personalized))
                continue
            s = self.fusion.score(feats)
            top = top_indices(s, min(k, len(s)))
            out.append(Ranked(ids[top], s[top].astype(np.float32), rows[top], personalized))
        return out

    def _candidates(
        self, requests: Sequence[Request], vec: np.ndarray, interest: dict[int, np.ndarray] | None, index: ItemIndex | None = None
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
        """Per request: (features (m, F), raw ids (m,), rows (m,), personalized) of the merged channels."""
        cfg = self.config
        n_rows = min(self.n_rows, len(vec))
        qs = self.trainer.query_vectors(np.array([r.user_id for r in requests], np.int64), [r.session.item_ids for r in requests]) if requests else None
        pops = [p.log_relative(n_rows) if len(p.values) >= n_rows else np.zeros(n_rows, np.float32) for p in self.pops]
        has_vec = self.has_vector[:n_rows] if vec is self.vectors else np.linalg.norm(vec[:n_rows], axis=1) > 0
        raw = np.asarray(self.raw[:n_rows], np.int64)
        mask_cache: dict[int, np.ndarray] = {}
        if index is None:
            index = self.index if vec is self.vectors else self.index_for(vec)
        tt_hits = self._two_tower_search(requests, qs, index, n_rows, mask_cache)
        trend_cache: dict[int, np.ndarray] = {}
        res: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
        sessions = [r.session.item_ids for r in requests]
        # the channels for the whole batch at once (each equals its per-session call)
        distinct = recent_distinct(sessions, max(3, self.sknn.query_len))
        flat = [  # (ids, scores, request bounds) of i2i after, before, last, and session kNN
            self.i2i.scores_flat(sessions, 0, distinct=distinct),
            self.i2i.scores_flat(sessions, 1, distinct=distinct),
            self.i2i.scores_flat(sessions, 0, query_len=1, distinct=distinct),
            self.sknn.scores_flat(sessions, [r.user_id for r in requests], distinct=distinct),
        ]
        lens = [len(x) for x in sessions]
        all_sess_rows = self._rows(np.concatenate(sessions).astype(np.int64, copy=False)) if sum(lens) else np.zeros(0, np.int64)
        sess_bounds = np.concatenate([[0], np.cumsum(lens)]).tolist()
        chan_rows = [self._rows(ids) for ids, _, _ in flat]
        cands: list[np.ndarray] = []
        kept: list[tuple[bool, np.ndarray | None, np.ndarray]] = []
        all_ok = np.ones(n_rows, bool)  # read-only: requests without exclusions share it
        oks: list[np.ndarray] = []
        for req in requests:
            ok = all_ok
            if req.allowed is not None:
                key = id(req.allowed)
                m = mask_cache.get(key)
                if m is None:
                    ar = self._rows(req.allowed)
                    m = np.zeros(n_rows, bool)
                    m[ar[(ar >= 0) & (ar < n_rows)]] = True
                    mask_cache[key] = m
                ok = m
            if req.exclude:
                ok = ok.copy()
                er = self._rows(np.fromiter(req.exclude, np.int64, len(req.exclude)))
                ok[er[(er >= 0) & (er < n_rows)]] = False
            oks.append(ok)
        chan_top = [_channel_top(flat[c][1], flat[c][2], chan_rows[c], oks, n_rows, kk) for c, kk in ((0, cfg.i2i_k), (1, cfg.i2i_k), (3, cfg.sknn_k))]
        for j, req in enumerate(requests):
            ok = oks[j]
            sess_rows = all_sess_rows[sess_bounds[j] : sess_bounds[j + 1]]
            q_ok = bool(np.any(qs[j])) if qs is not None else False
            parts: list[np.ndarray] = []
            if q_ok:
                hits = tt_hits[j]
                parts.append(_exact_top(hits[ok[hits]], vec, qs[j], cfg.two_tower_k))
            iv = interest.get(j) if interest else None
            iv_scores = None
            if iv is not None and n_rows:
                iv_scores = vec[:n_rows] @ iv
                s = np.where(ok & has_vec, iv_scores, -np.inf)
                parts.append(top_indices(s, min(cfg.two_tower_k // 2, int(np.isfinite(s).sum()))))
            parts += [top_rows[tb[j] : tb[j + 1]] for top_rows, tb in chan_top]
            key = id(req.allowed) if req.allowed is not None else -1
            tr = trend_cache.get(key) if not req.exclude else None
            if tr is None:
                s = np.where(ok, pops[0] + 1e-3 * pops[2], -np.inf)
                tr = top_indices(s, min(cfg.trending_k + (len(req.exclude) if req.exclude else 0), int(np.isfinite(s).sum())))
                tr = tr[ok[tr]][: cfg.trending_k]
                if not req.exclude:
                    trend_cache[key] = tr
            parts.append(tr)
            sr = sess_rows[(sess_rows >= 0) & (sess_rows < n_rows)]
            parts.append(sr[ok[sr]])
            cands.append(np.unique(np.concatenate(parts)))
            kept.append((q_ok, iv_scores, sess_rows))
        # features of every request's merged candidates at once (elementwise, as per request)
        cb = np.concatenate([[0], np.cumsum([len(c) for c in cands])]).tolist() if cands else [0]
        cand_all = np.concatenate(cands).astype(np.int64, copy=False) if cands else np.zeros(0, np.int64)
        raw_all = raw[cand_all]
        grp_c = np.repeat(np.arange(len(cands)), np.diff(cb))
        f_all = np.zeros((len(cand_all), N_FEATURES), np.float32)
        for name, c in (("i2i_after", 0), ("i2i_before", 1), ("i2i_last", 2), ("sknn", 3)):
            ids_, sc_, bounds = flat[c]
            if len(ids_):
                f_all[:, _F[name]] = np.log1p(50.0 * _lookup_grouped(grp_c, raw_all, ids_, bounds, sc_))
        ids_, sc_, bounds = flat[0]
        if len(ids_):
            grp = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
            order = np.lexsort((ids_, -sc_, grp))  # by request, then as each request's own order
            rank = np.empty(len(ids_), np.float64)
            rank[order] = np.arange(len(ids_)) - np.asarray(bounds, np.int64)[grp[order]]
            f_all[:, _F["i2i_rank"]] = _lookup_grouped(grp_c, raw_all, ids_, bounds, 1.0 / (1.0 + rank))
        f_all[:, _F["pop_day"]] = pops[0][cand_all]
        f_all[:, _F["pop_week"]] = pops[1][cand_all]
        f_all[:, _F["pop_all"]] = pops[2][cand_all]
        for j, req in enumerate(requests):
            q_ok, iv_scores, sess_rows = kept[j]
            cand = cands[j]
            f = f_all[cb[j] : cb[j + 1]]
            if len(cand):
                if q_ok:
                    t = np.where(has_vec[cand], vec[cand] @ qs[j], 0.0)
                    f[:, _F["two_tower_z"]] = _z(t)
                if iv_scores is not None:
                    f[:, _F["interest"]] = _z(iv_scores[cand])
                if len(sess_rows):
                    _session_features(f, cand, sess_rows, req.session.ts_ms, req.at_ms)
            res.append((f.copy(), raw_all[cb[j] : cb[j + 1]], cand, q_ok or len(sess_rows) > 0))
        return res

    def _two_tower_search(
        self, requests: Sequence[Request], qs: np.ndarray | None, index: ItemIndex, n_rows: int, mask_cache: dict[int, np.ndarray]
    ) -> dict[int, np.ndarray]:
        """Request index -> rows the two-tower channel may take its top ``two_tower_k`` from.

        One FAISS search per distinct ``allowed`` set (the rows live then), over-fetched by the
        request's excluded items and ``_TIE_MARGIN``, so ``_exact_top`` over the hits equals an
        exact search on a flat index. A request excluding more than ``_BATCH_EXCLUDE_MAX``
        items is searched alone with them blocked. Fills ``mask_cache`` (allowed rows by set).
        """
        k = self.config.two_tower_k
        if qs is None or len(index) == 0 or n_rows == 0:
            return {j: np.zeros(0, np.int64) for j in range(len(requests))}
        groups: dict[int, list[int]] = {}
        for j, req in enumerate(requests):
            if np.any(qs[j]):
                groups.setdefault(id(req.allowed) if req.allowed is not None else -1, []).append(j)
        out: dict[int, np.ndarray] = {}

        def keep(ids: np.ndarray) -> np.ndarray:
            return ids[(ids >= 0) & (ids < n_rows)]

        for key, js in groups.items():
            allowed = None
            if key != -1:
                m = mask_cache.get(key)
                if m is None:
                    ar = self._rows(requests[js[0]].allowed)  # type: ignore[arg-type]
                    m = np.zeros(n_rows, bool)
                    m[ar[(ar >= 0) & (ar < n_rows)]] = True
                    mask_cache[key] = m
                allowed = np.flatnonzero(m)
            n_ex = [len(requests[j].exclude or ()) for j in js]
            batch = [j for j, e in zip(js, n_ex) if e <= _BATCH_EXCLUDE_MAX]
            if batch:
                kk = min(len(index), k + _TIE_MARGIN + max(e for e in n_ex if e <= _BATCH_EXCLUDE_MAX))
                _, ids = index.search(qs[batch], kk, allowed=allowed)
                out.update((j, keep(ids[b])) for b, j in enumerate(batch))
            for j, e in zip(js, n_ex):
                if e > _BATCH_EXCLUDE_MAX:
                    ex = self._rows(np.fromiter(requests[j].exclude or (), np.int64, e))
                    _, ids = index.search(qs[j : j + 1], min(len(index), k + _TIE_MARGIN), allowed=allowed, blocked=ex[ex >= 0])
                    out[j] = keep(ids[0])
        return out


#: The two-tower channel's index: ``auto`` (flat, exact, below 50,000 items; IVF above), with
#: search breadths for its depth of ~100 (measured on 20,000 clustered items, 16 dims, k=100:
#: IVF nprobe 16 -> recall 0.79, 64 -> 0.98; HNSW efSearch 128 -> 0.79, 512 -> 0.96).
TWO_TOWER_INDEX = IndexConfig(nprobe=64, ef_search=512)
#: Extra two-tower hits fetched beyond ``two_tower_k``: FAISS's float32 scores may order
#: near-ties differently from the exact rescoring that picks the top k.
_TIE_MARGIN = 16
#: Excluded items up to which a request shares its group's batched search (over-fetching).
_BATCH_EXCLUDE_MAX = 1024


def _exact_top(rows: np.ndarray, vec: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best of ``rows`` by ``vec[row] . q`` in float64, ties to the lower row (the
    pinned rule: the evaluation stays deterministic whatever order FAISS returned)."""
    if len(rows) == 0 or k <= 0:
        return np.zeros(0, np.int64)
    s = vec[rows].astype(np.float64) @ np.asarray(q, np.float64)
    return rows[np.lexsort((rows, -s))[:k]]


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return ((x - x.mean()) / sd).astype(np.float32) if sd > 1e-9 else np.zeros(len(x), np.float32)


def _lookup(ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[keys == id] per id (0 where absent); ``keys`` sorted unique."""
    pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
    hit = keys[pos] == ids
    return np.where(hit, values[pos], 0.0)


def _channel_top(
    scores: np.ndarray, bounds: list[int], rows: np.ndarray, oks: list[np.ndarray], n_rows: int, k: int
) -> tuple[np.ndarray, list[int]]:
    """A recall channel's contribution for every request at once: of request j's (rows, scores)
    at ``bounds[j]:bounds[j + 1]``, the known rows that ``oks[j]`` allows, best ``k`` by score,
    ties to the lower row; as one array with the requests' bounds in it."""
    n = len(oks)
    grp = np.repeat(np.arange(n, dtype=np.int64), np.diff(bounds))
    keep = (rows >= 0) & (rows < n_rows)
    if n_rows and len(rows):
        r = np.where(keep, rows, 0)
        by_mask: dict[int, list[int]] = {}  # requests by mask object (shared per allowed set)
        for j, ok in enumerate(oks):
            by_mask.setdefault(id(ok), []).append(j)
        if len(by_mask) == 1:
            keep &= oks[0][r]
        else:
            allowed = np.zeros(len(rows), bool)
            for js in by_mask.values():
                ok = oks[js[0]]
                if len(js) == 1:
                    lo, hi = bounds[js[0]], bounds[js[0] + 1]
                    allowed[lo:hi] = ok[r[lo:hi]]
                else:
                    sel = np.isin(grp, js)
                    allowed[sel] = ok[r[sel]]
            keep &= allowed
    r, s, g = rows[keep], scores[keep], grp[keep]
    order = np.lexsort((r, -s, g))
    cnt = np.bincount(g, minlength=n)
    rank = np.arange(len(order)) - (np.cumsum(cnt) - cnt)[g[order]]
    took = np.minimum(cnt, k)
    return r[order[rank < k]], np.concatenate([[0], np.cumsum(took)]).astype(np.int64).tolist()


def _lookup_grouped(grp: np.ndarray, ids: np.ndarray, keys: np.ndarray, bounds: list[int], values: np.ndarray) -> np.ndarray:
    """``_lookup`` per request: ``ids`` of request ``grp`` looked up in ``keys[bounds[g]:bounds[g+1]]``
    (each sorted unique), with one binary search for all requests."""
    out = np.zeros(len(ids), np.float64)
    if len(ids) == 0 or len(keys) == 0:
        return out
    span = int(max(ids.max(), keys.max())) + 1
    n = len(bounds) - 1
    if min(int(ids.min()), int(keys.min())) < 0 or n * span >= 2**62:  # keys would not fit: per request
        for g in range(n):
            lo, hi = bounds[g], bounds[g + 1]
            sel = grp == g
            if hi > lo and sel.any():
                out[sel] = _lookup(ids[sel], keys[lo:hi], values[lo:hi])
        return out
    kg = np.repeat(np.arange(n, dtype=np.int64), np.diff(bounds)) * span + keys
    return _lookup(grp * span + ids, kg, values)


def _session_features(f: np.ndarray, cand: np.ndarray, sess_rows: np.ndarray, sess_ts: np.ndarray, now: int) -> None:
    """REP count over the last 16, recency of the last consumption and is-last, per candidate."""
    last_ts: dict[int, int] = {}
    count16: dict[int, int] = {}
    n = len(sess_rows)
    for j, (r, t) in enumerate(zip(sess_rows.tolist(), sess_ts.tolist())):
        if r < 0:
            continue
        last_ts[r] = t
        if j >= n - 16:
            count16[r] = count16.get(r, 0) + 1
    pos = {int(c): j for j, c in enumerate(cand.tolist())}
    for r, t in last_ts.items():
        j = pos.get(r)
        if j is None:
            continue
        age = max(0.0, float(now - t))
        f[j, _F["rep16"]] = math.log1p(count16.get(r, 0))
        f[j, _F["recency_10m"]] = math.exp(-age / 600_000.0)
        f[j, _F["recency_1h"]] = math.exp(-age / 3_600_000.0)
        f[j, _F["recency_1d"]] = math.exp(-age / DAY_MS)
    last = int(sess_rows[-1])
    j = pos.get(last)
    if j is not None:
        f[j, _F["is_last"]] = 1.0


def build_recommender(
    num_users: int,
    num_items: int,
    dim: int,
    num_categories: int = 2,
    session_gap_ms: int = 30 * 60_000,
    seed: int = 0,
    exclude_consumed: bool = False,
    item_categories: dict[int, int] | None = None,
    allowed_at: Callable[[int], np.ndarray | None] | None = None,
    base: RecommenderConfig | None = None,
) -> CloudRecommender:
    """The production cloud at a given capacity: what ``tandem evaluate`` sizes for a log and
    ``tandem serve cloud`` sizes from its settings (one recipe, so both run the same model)."""
    import dataclasses

    base = base or RecommenderConfig()
    tcfg = dataclasses.replace(
        base.two_tower,
        num_users=int(num_users),
        num_items=int(num_items),
        num_categories=int(num_categories),
        embedding_dim=int(dim),
        out_dim=int(dim),
        user_hidden=(64,),
        item_hidden=(64,),
        batch_size=64,
        seed=int(seed),
    )
    rcfg = dataclasses.replace(base, two_tower=tcfg, session_gap_ms=int(session_gap_ms), seed=int(seed))
    return CloudRecommender(rcfg, exclude_consumed=exclude_consumed, item_categories=item_categories, allowed_at=allowed_at)
