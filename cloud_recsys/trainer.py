"""Online training of the two-tower from the interaction stream.

Prequential (test-then-train, as in River): every mini-batch is first scored
with the current model (in-batch recall of its positives), then learned from.
``fit`` warm-starts offline from an ``EventLog`` in time order; ``run`` consumes
a transport topic, and checkpoints model, optimizers, id maps, histories, logQ
counts and consumer offsets together (cloud_recsys/checkpoint.py), so a restart
resumes exactly where the last checkpoint left off: no event lost, none trained
twice.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cloud_recsys.config import TwoTowerConfig
from cloud_recsys.features import ALL_KEYS, UserHistory, build_kjt
from cloud_recsys.ids import IdMap
from cloud_recsys.popularity import Popularity
from cloud_recsys.two_tower import TwoTower, in_batch_logits, sampled_softmax_loss
from streams.batch import EventBatch, decode_valid
from streams.datasets.base import EventLog
from streams.schema import POSITIVE_KINDS, SchemaError
from streams.transport import Consumer

log = logging.getLogger(__name__)

_POS = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)
#: Category raw id used for items without a known category.
NO_CATEGORY: int = -1


def positives(batch: EventBatch) -> EventBatch:
    """Rows that are training positives: a positive kind from a real user."""
    return batch.take(np.isin(batch.kind, _POS) & (batch.user_id >= 0))


def _inbatch_recall(logits: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Share of rows whose diagonal (positive) ranks in the top k of the row."""
    pos = logits.diagonal()[:, None]
    rank = (logits > pos).sum(dim=1)
    return {f"inbatch_recall@{k}": float((rank < k).float().mean()) for k in ks}


class OnlineTrainer:
    """Trains ``TwoTower`` on a stream and exports user/item vectors for retrieval.

    Args:
        config: model and training configuration.
        item_categories: raw item id -> raw category id (side feature); missing items
            get ``NO_CATEGORY``. More can be added later with ``set_item_categories``.
        popularity_half_life_ms: decay of the popularity fallback kept beside the model.
    """

    def __init__(
        self,
        config: TwoTowerConfig,
        item_categories: dict[int, int] | None = None,
        popularity_half_life_ms: float | None = 7 * 24 * 3600 * 1000.0,
    ) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.model = TwoTower(config)
        self.users = IdMap(config.num_users)
        self.items = IdMap(config.num_items)
        self.categories = IdMap(config.num_categories)
        self.item_categories: dict[int, int] = {int(k): int(v) for k, v in (item_categories or {}).items()}
        self.item_category_row = np.zeros(self.items.num_rows, dtype=np.int64)
        self.history = UserHistory(self.users.num_rows, config.history_len)
        self.item_counts = np.zeros(self.items.num_rows, dtype=np.float64)  # logQ: exact stream counts per row
        self.popularity = Popularity(popularity_half_life_ms)
        self.sparse_opt = torch.optim.Adagrad(self.model.ebc.parameters(), lr=config.lr_sparse)
        dense = list(self.model.user_mlp.parameters()) + list(self.model.item_mlp.parameters())
        self.dense_opt = torch.optim.Adam(dense, lr=config.lr_dense, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.version = 0
        self.steps = 0
        self.events_trained = 0
        self.skipped_records = 0
        self.skipped_rows = 0
        self.offsets: dict[int, int] = {}  # partition -> next offset to train on
        self.restored = False
        #: uploaded interest vectors (feature family), least recently uploaded first; bounded by
        #: ``max_user_overrides`` (the user table's size): uploads from ever-new device ids must
        #: not grow the cloud's memory without end, and a user who stopped uploading long ago
        #: falls back to the model's own vector.
        self.user_overrides: OrderedDict[int, np.ndarray] = OrderedDict()
        self.max_user_overrides = int(config.num_users)
        self.interest_share = 0.5  # share of a list the interest-vector recall channel may fill
        self.item_residuals: dict[int, np.ndarray] = {}  # output-space deltas from devices (known items only: bounded by num_items)
        self.lock = threading.RLock()
        self.categories.lookup(np.array([NO_CATEGORY]), add=True)  # row 0: unknown category

    # -- ids and side features ---------------------------------------------------
    def set_item_categories(self, item_categories: dict[int, int]) -> None:
        """Add/replace item categories (applies to rows already assigned too)."""
        with self.lock:
            self.item_categories.update({int(k): int(v) for k, v in item_categories.items()})
            rows = np.arange(len(self.items))
            self._assign_categories(rows, self.items.to_raw(rows))

    def _assign_categories(self, rows: np.ndarray, raw: np.ndarray) -> None:
        if len(rows) == 0:
            return
        cats = np.fromiter((self.item_categories.get(int(r), NO_CATEGORY) for r in raw), dtype=np.int64, count=len(raw))
        self.item_category_row[rows] = self.categories.lookup(cats, add=True)

    def _item_rows(self, item_raw: np.ndarray, add: bool) -> np.ndarray:
        before = len(self.items)
        rows = self.items.lookup(item_raw, add=add)
        if len(self.items) > before:
            new = np.arange(before, len(self.items))
            self._assign_categories(new, self.items.to_raw(new))
        return rows

    def known_users(self, user_ids: np.ndarray) -> np.ndarray:
        """Bool mask: users the model can personalise for (seen in training or with an uploaded vector)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        known = self.users.lookup(user_ids) >= 0
        if self.user_overrides:
            known |= np.isin(user_ids, np.fromiter(self.user_overrides, dtype=np.int64))
        return known

    # -- training ----------------------------------------------------------------
    def train_batch(self, batch: EventBatch) -> dict[str, float]:
        """Test-then-train on the positives of ``batch`` (in chunks of ``batch_size``).

        Returns:
            ``n`` (positives trained), ``loss`` and in-batch recall@1/@10 measured
            *before* the update (means over chunks, weighted by size).
        """
        pos = positives(batch)
        if len(pos) == 0:
            return {"n": 0}
        bs = self.config.batch_size
        totals: dict[str, float] = {}
        with self.lock:
            for start in range(0, len(pos), bs):
                sl = slice(start, start + bs)
                m = self._step(pos.user_id[sl], pos.item_id[sl], pos.ts_ms[sl])
                n = m["n"]
                for key, val in m.items():
                    totals[key] = totals.get(key, 0.0) + (val if key == "n" else val * n)
        n = totals.pop("n")
        return {"n": int(n), **{k: v / n for k, v in totals.items()}}

    def _step(self, user_raw: np.ndarray, item_raw: np.ndarray, ts: np.ndarray) -> dict[str, float]:
        """One online step: assign ids, read histories before pushing, count, then learn."""
        u = self.users.lookup(user_raw, add=True)
        i = self._item_rows(item_raw, add=True)
        hist = self.history.read_before_push(u, i, ts)
        np.add.at(self.item_counts, i, 1.0)
        self.popularity.update(item_raw, ts)
        self.events_trained += len(u)
        return self._learn(u, i, hist)

    def _learn(self, u: np.ndarray, i: np.ndarray, hist: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        """Forward (metrics measured before the update), sampled-softmax loss, optimizer steps."""
        cfg = self.config
        b = len(u)
        if b < 2:  # in-batch softmax needs a negative
            return {"n": b}
        self.model.train()
        kjt = build_kjt(b, u, hist, i, self.item_category_row[i])
        keep = None
        if cfg.user_id_dropout > 0:
            keep = (torch.rand(b, 1, generator=self.generator) >= cfg.user_id_dropout).float()
        user, item = self.model(kjt, keep)
        rows_t = torch.from_numpy(i)
        log_q = None
        if cfg.logq_correction:
            log_q = torch.from_numpy(np.log(self.item_counts[i] / self.item_counts.sum())).float()
        logits = in_batch_logits(user, item, rows_t, cfg.temperature, log_q, cfg.mask_accidental_hits)
        loss = sampled_softmax_loss(logits)
        with torch.no_grad():
            metrics = _inbatch_recall(in_batch_logits(user, item, rows_t, cfg.temperature, None, True))
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()
        self.steps += 1
        return {"n": b, "loss": float(loss.detach()), **metrics}

    @torch.no_grad()
    def score_batch(self, batch: EventBatch) -> dict[str, float]:
        """In-batch recall of the batch's positives under the current model; changes nothing.

        Unknown users/items are left out (``n`` says how many were scored).
        """
        pos = positives(batch)
        with self.lock:
            u = self.users.lookup(pos.user_id)
            i = self.items.lookup(pos.item_id)
            ok = (u >= 0) & (i >= 0)
            u, i = u[ok], i[ok]
            if len(u) < 2:
                return {"n": int(len(u))}
            self.model.eval()
            kjt = build_kjt(len(u), u, self.history.read(u), i, self.item_category_row[i])
            user, item = self.model(kjt)
            logits = in_batch_logits(user, item, torch.from_numpy(i), self.config.temperature)
        return {"n": int(len(u)), **_inbatch_recall(logits)}

    def fit(self, log_: EventLog, epochs: int = 1, progress: bool = False, shuffle: bool = True) -> dict[str, float]:
        """Offline warm start on ``log_``'s positives.

        Features are built in one pass in time order (each example's history holds only
        earlier events: no leakage; logQ counts and popularity see each event once), then
        ``epochs`` passes learn from them. ``shuffle`` mixes examples across the log per
        epoch: time-ordered batches of rating logs are dominated by one user's session,
        which makes in-batch negatives nearly all the same user's items.

        Returns:
            the last epoch's mean loss and in-batch recall@10.
        """
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        whole = positives(EventBatch.from_frame(log_.events))
        if log_.items is not None and "category" in log_.items.columns:
            self.set_item_categories(dict(zip(log_.items.item_id.astype("int64"), log_.items.category.astype("int64"))))
        with self.lock:
            u = self.users.lookup(whole.user_id, add=True)
            i = self._item_rows(whole.item_id, add=True)
            vals, lens = self.history.read_before_push(u, i, whole.ts_ms)
            np.add.at(self.item_counts, i, 1.0)
            self.popularity.update(whole.item_id, whole.ts_ms)
            self.events_trained += len(whole)
        starts = np.concatenate([[0], np.cumsum(lens)])
        rng = np.random.default_rng(self.config.seed + self.steps)
        bs = self.config.batch_size
        last: dict[str, float] = {}
        for epoch in range(epochs):
            order = rng.permutation(len(u)) if shuffle else np.arange(len(u))
            batches = range(0, len(order), bs)
            if progress:
                from tqdm import tqdm

                batches = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
            losses, recalls = [], []
            for s in batches:
                idx = order[s : s + bs]
                hv = np.concatenate([vals[starts[j] : starts[j + 1]] for j in idx]) if len(idx) else vals[:0]
                with self.lock:
                    m = self._learn(u[idx], i[idx], (hv, lens[idx]))
                if "loss" in m:
                    losses.append(m["loss"])
                    recalls.append(m["inbatch_recall@10"])
            last = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                    "inbatch_recall@10": float(np.mean(recalls)) if recalls else float("nan")}  # fmt: skip
            log.info("fit epoch %d/%d: %s", epoch + 1, epochs, last)
        return last

    # -- streaming -----------------------------------------------------------------
    def _seek(self, consumer: Consumer) -> None:
        """Move the consumer to the offsets this trainer's state corresponds to."""
        if not self.offsets and not self.restored:
            return
        for p in consumer.positions():
            consumer.seek(p, self.offsets.get(p, 0))

    def run(
        self,
        consumer: Consumer,
        max_records: int | None = None,
        checkpoint_every: int | None = None,
        checkpoint_path: str | Path | None = None,
        poll_timeout_s: float = 1.0,
    ) -> int:
        """Consume records and train until the topic is drained (an empty poll) or ``max_records``.

        Records are decoded with ``decode_valid``; undecodable records and invalid rows are
        skipped with a logged reason. Events are buffered up to ``batch_size`` and trained at
        record boundaries, so ``offsets`` always mark exactly what the model has learned.

        Args:
            consumer: a ``streams.transport.Consumer``; first seeked to ``self.offsets``
                (the checkpoint's) when this trainer holds trained or restored state.
            max_records: stop after this many records.
            checkpoint_every: save a checkpoint after every this many records (needs
                ``checkpoint_path``); one is also saved at the end.
            checkpoint_path: file for ``save``.

        Returns:
            records consumed.
        """
        if checkpoint_every is not None and (checkpoint_every <= 0 or checkpoint_path is None):
            raise ValueError("checkpoint_every needs a positive value and a checkpoint_path")
        self._seek(consumer)
        buffer: list[EventBatch] = []
        buffered = 0
        pending: dict[int, int] = {}
        done = since_ckpt = 0

        def flush() -> None:
            nonlocal buffer, buffered, pending
            if buffer:
                self.train_batch(EventBatch.concat(buffer))
            self.offsets.update(pending)
            buffer, buffered, pending = [], 0, {}
            if self.offsets:
                consumer.commit(dict(self.offsets))

        while max_records is None or done < max_records:
            limit = 500 if max_records is None else min(500, max_records - done)
            records = consumer.poll(max_records=limit, timeout_s=poll_timeout_s)
            if not records:
                break
            for rec in records:
                try:
                    batch, bad = decode_valid(rec.value)
                except SchemaError as exc:
                    self.skipped_records += 1
                    log.warning("skipping record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc.reason)
                else:
                    if bad:
                        self.skipped_rows += len(bad)
                        log.warning("record %s[%d]@%d: skipped %d invalid rows (first: row %d, %s)",
                                    rec.topic, rec.partition, rec.offset, len(bad), bad[0][0], bad[0][1])  # fmt: skip
                    pos = positives(batch)
                    if len(pos):
                        buffer.append(pos)
                        buffered += len(pos)
                pending[rec.partition] = rec.offset + 1
                done += 1
                since_ckpt += 1
                if buffered >= self.config.batch_size:
                    flush()
                if checkpoint_every is not None and since_ckpt >= checkpoint_every:
                    flush()
                    self.save(checkpoint_path)  # type: ignore[arg-type]
                    since_ckpt = 0
        flush()
        if checkpoint_path is not None and since_ckpt:
            self.save(checkpoint_path)
        return done

    # -- vectors for retrieval -----------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, user_ids: np.ndarray, at_ms: int | None = None) -> np.ndarray:
        """(n, out_dim) float32 unit query vectors; zeros for unknown users.

        Args:
            user_ids: raw user ids.
            at_ms: only history items before this time are used (no look-ahead in replays).
        A user the model has not seen but who uploaded an interest vector (``set_user_vectors``)
        gets that vector as the query; for known users the vector is a second recall channel
        (``interest_vectors``, merged by the service), not part of the query.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64).ravel()
        out = np.zeros((len(user_ids), self.config.out_dim), dtype=np.float32)
        with self.lock:
            rows = self.users.lookup(user_ids)
            ok = rows >= 0
            if ok.any():
                r = rows[ok]
                self.model.eval()
                kjt = build_kjt(len(r), r, self.history.read(r, at_ms))
                out[ok] = self.model.user_tower(kjt).numpy()
            if self.user_overrides:
                for j in np.flatnonzero(~ok).tolist():
                    vec = self.user_overrides.get(int(user_ids[j]))
                    if vec is not None:
                        out[j] = vec
        return out

    def query_vectors(self, user_ids: np.ndarray, recent_items: Sequence[np.ndarray]) -> np.ndarray:
        """(n, out_dim) unit query vectors from request-time histories (the device's session).

        Args:
            user_ids: raw user ids; a user the model has never seen contributes no id
                embedding, so a cold user's query comes from the session alone.
            recent_items: per user, the raw item ids the device sent (oldest first); only
                the last ``history_len`` known items are pooled.
        Rows with neither a known user nor a known item are zeros.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64).ravel()
        n = len(user_ids)
        out = np.zeros((n, self.config.out_dim), dtype=np.float32)
        if n == 0:
            return out
        L = self.config.history_len
        with self.lock:
            urows = self.users.lookup(user_ids)
            hv: list[np.ndarray] = []
            hl = np.zeros(n, dtype=np.int64)
            for j, items in enumerate(recent_items):
                rows = self.items.lookup(np.asarray(items, dtype=np.int64))
                rows = rows[rows >= 0][-L:]
                hv.append(rows)
                hl[j] = len(rows)
            ok = (urows >= 0) | (hl > 0)
            if not ok.any():
                return out
            sel = np.flatnonzero(ok)
            ul = (urows[sel] >= 0).astype(np.int64)
            values = np.concatenate([urows[sel][ul > 0]] + [hv[j] for j in sel.tolist()] + [np.empty(0, np.int64)] * 2)
            lengths = np.concatenate([ul, hl[sel], np.zeros(len(sel), np.int64), np.zeros(len(sel), np.int64)])
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=list(ALL_KEYS), values=torch.from_numpy(values.astype(np.int64)), lengths=torch.from_numpy(lengths)
            )
            self.model.eval()
            with torch.no_grad():
                out[sel] = self.model.user_tower(kjt).numpy()
        return out

    def interest_vectors(self, user_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Position in ``user_ids`` -> uploaded interest vector, for users the model also knows."""
        if not self.user_overrides:
            return {}
        user_ids = np.asarray(user_ids, dtype=np.int64).ravel()
        with self.lock:
            ok = self.users.lookup(user_ids) >= 0
            return {j: self.user_overrides[int(u)] for j, u in enumerate(user_ids.tolist()) if ok[j] and int(u) in self.user_overrides}

    @torch.no_grad()
    def item_vectors(self, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """(raw item ids, (n, out_dim) float32 unit vectors) of every item seen so far."""
        with self.lock:
            n = len(self.items)
            ids = self.items.raw_ids()
            out = np.zeros((n, self.config.out_dim), dtype=np.float32)
            self.model.eval()
            for s in range(0, n, chunk):
                rows = np.arange(s, min(s + chunk, n))
                kjt = build_kjt(len(rows), item_rows=rows, category_rows=self.item_category_row[rows])
                out[s : s + len(rows)] = self.model.item_tower(kjt).numpy()
            if self.item_residuals:
                rows = self.items.lookup(np.fromiter(self.item_residuals, dtype=np.int64))
                for r, vec in zip(rows.tolist(), self.item_residuals.values()):
                    if r >= 0:
                        v = out[r] + vec
                        out[r] = v / max(float(np.linalg.norm(v)), 1e-12)
        return ids, out

    # -- device-side contributions ------------------------------------------------------
    def set_user_vectors(self, vectors: dict[int, np.ndarray], share: float | None = None) -> int:
        """Store uploaded interest vectors (raw user id -> (out_dim,)); returns how many were kept.

        Args:
            share: when given, the new ``interest_share`` (fraction of a candidate list the
                interest channel may fill).
        """
        if share is not None:
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"share must be in [0, 1], got {share}")
            self.interest_share = float(share)
        kept = 0
        with self.lock:
            for uid, vec in vectors.items():
                v = np.asarray(vec, dtype=np.float32).ravel()
                if v.shape != (self.config.out_dim,) or not np.isfinite(v).all():
                    log.warning("ignoring user vector for %s: shape %s or non-finite values", uid, v.shape)
                    continue
                norm = float(np.linalg.norm(v))
                if norm == 0.0:  # no direction: as a recall channel it would rank items arbitrarily
                    log.warning("ignoring all-zero user vector for %s", uid)
                    continue
                self.user_overrides[int(uid)] = v / norm
                self.user_overrides.move_to_end(int(uid))
                kept += 1
            while len(self.user_overrides) > self.max_user_overrides:
                self.user_overrides.popitem(last=False)
        return kept

    def apply_embedding_deltas(self, table: str, deltas: dict[int, np.ndarray], space: str = "auto") -> int:
        """Add aggregated deltas to rows of ``table`` ("item" or "user"), keyed by raw id.

        Args:
            table: "item" or "user".
            deltas: raw id -> delta.
            space: "table": width ``embedding_dim``, added to the sparse table row;
                "output" (items only): width ``out_dim``, the space devices hold (the
                candidate item features), kept as a residual added to the exported vector;
                "auto": decided by the width, which is ambiguous (``ValueError``) when
                ``embedding_dim == out_dim`` (the default config), so callers that know
                the space must say it.
        Unknown ids, non-finite values and bad widths are skipped with a warning. Returns rows changed.
        """
        if table not in ("item", "user"):
            raise ValueError(f"table must be 'item' or 'user', got {table!r}")
        if space not in ("auto", "table", "output"):
            raise ValueError(f"space must be 'auto', 'table' or 'output', got {space!r}")
        if space == "output" and table != "item":
            raise ValueError("output-space deltas exist only for items (user vectors: set_user_vectors)")
        cfg = self.config
        if space == "auto" and table == "item" and cfg.embedding_dim == cfg.out_dim:
            raise ValueError(
                f"embedding_dim == out_dim == {cfg.out_dim}: say space='table' or space='output' for item deltas"
            )
        idmap = self.items if table == "item" else self.users
        weight = self.model.ebc.embedding_bags["t_item" if table == "item" else "t_user"].weight
        changed = 0
        with self.lock, torch.no_grad():
            for raw, delta in deltas.items():
                d = np.asarray(delta, dtype=np.float32).ravel()
                row = int(idmap.lookup(np.array([raw]))[0])
                if row < 0 or not np.isfinite(d).all():
                    log.warning("skipping %s delta for id %s: unknown id or non-finite", table, raw)
                    continue
                if space in ("auto", "table") and d.shape == (cfg.embedding_dim,):
                    weight[row] += torch.from_numpy(d)
                elif space in ("auto", "output") and table == "item" and d.shape == (cfg.out_dim,):
                    prev = self.item_residuals.get(int(raw))
                    self.item_residuals[int(raw)] = d if prev is None else prev + d
                else:
                    log.warning("skipping %s delta for id %s: shape %s (space %s)", table, raw, d.shape, space)
                    continue
                changed += 1
        return changed

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs, as one picklable dict (see checkpoint.py)."""
        with self.lock:
            return {
                "config": asdict(self.config),
                "model": self.model.state_dict(),
                "sparse_opt": self.sparse_opt.state_dict(),
                "dense_opt": self.dense_opt.state_dict(),
                "generator": self.generator.get_state(),
                "users": self.users.state_dict(),
                "items": self.items.state_dict(),
                "categories": self.categories.state_dict(),
                "item_categories": dict(self.item_categories),
                "item_category_row": self.item_category_row.copy(),
                "history": self.history.state_dict(),
                "item_counts": self.item_counts.copy(),
                "popularity": self.popularity.state_dict(),
                "user_overrides": dict(self.user_overrides),
                "interest_share": self.interest_share,
                "item_residuals": dict(self.item_residuals),
                "offsets": dict(self.offsets),
                "counters": {"version": self.version, "steps": self.steps, "events_trained": self.events_trained,
                             "skipped_records": self.skipped_records, "skipped_rows": self.skipped_rows},  # fmt: skip
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = TwoTowerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
        if saved != self.config:
            raise ValueError(f"checkpoint was written with a different config: {saved} != {self.config}")
        with self.lock:
            self.model.load_state_dict(state["model"])
            self.sparse_opt.load_state_dict(state["sparse_opt"])
            self.dense_opt.load_state_dict(state["dense_opt"])
            self.generator.set_state(state["generator"])
            self.users.load_state_dict(state["users"])
            self.items.load_state_dict(state["items"])
            self.categories.load_state_dict(state["categories"])
            self.item_categories = dict(state["item_categories"])
            self.item_category_row = np.asarray(state["item_category_row"], dtype=np.int64).copy()
            self.history.load_state_dict(state["history"])
            self.item_counts = np.asarray(state["item_counts"], dtype=np.float64).copy()
            self.popularity.load_state_dict(state["popularity"])
            overrides = [(int(k), np.asarray(v, np.float32)) for k, v in state["user_overrides"].items()]
            self.user_overrides = OrderedDict(overrides[-self.max_user_overrides :])
            self.interest_share = float(state.get("interest_share", 0.5))
            self.item_residuals = {int(k): np.asarray(v, np.float32) for k, v in state["item_residuals"].items()}
            self.offsets = {int(k): int(v) for k, v in state["offsets"].items()}
            c = state["counters"]
            self.version, self.steps, self.events_trained = int(c["version"]), int(c["steps"]), int(c["events_trained"])
            self.skipped_records, self.skipped_rows = int(c["skipped_records"]), int(c["skipped_rows"])
            self.restored = True

    def save(self, path: str | Path) -> Path:
        """Atomically write a checkpoint (model + offsets together)."""
        from cloud_recsys.checkpoint import save_checkpoint

        return save_checkpoint(self, path)

    def load(self, path: str | Path) -> None:
        """Restore from a checkpoint; the next ``run`` seeks its consumer to the saved offsets."""
        from cloud_recsys.checkpoint import load_checkpoint

        load_checkpoint(self, path)
