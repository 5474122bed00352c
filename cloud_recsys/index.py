"""FAISS item index with stable external ids, availability filtering and hot swap.

The model scores with dot products of unit vectors, so the index uses
``METRIC_INNER_PRODUCT`` (TorchRec's example index uses L2, which ranks
differently unless vectors are normalised). Kinds:

* ``flat``: ``IndexIDMap2(IndexFlatIP)``: exact; small corpora.
* ``ivf``: ``IndexIVFFlat`` (inner product) with ``DirectMap.Hashtable``: fast removals,
  ``nprobe`` trades recall for speed; ids are the raw item ids.
* ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``: fast, but HNSW cannot remove vectors: ``remove``
  on it rebuilds the whole index (documented cost), so prefer ``ivf`` when items churn.
* ``auto``: flat below ``auto_ivf_min`` items, IVF above.

Concurrency: searches hold a shared (read) lock; ``add``/``remove`` hold the exclusive
lock (FAISS searches are thread-safe, mutation is not). ``build`` constructs the new
index off the hot path and ``swap``s it in under the exclusive lock, so a search sees
either the old index or the new one, never a half-built one.

torch must be imported before faiss in a process (OpenMP clash); this module does so.
"""

from __future__ import annotations

import io
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch  # noqa: F401  (import order: torch before faiss)
import faiss  # noqa: E402

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    """How the item index is built and searched.

    Args:
        kind: "auto" | "flat" | "ivf" | "hnsw".
        nlist: IVF cells; None: ``4 * sqrt(N)`` clamped to [16, N // 39].
        nprobe: IVF cells visited per query.
        hnsw_m / ef_search: HNSW graph degree and search breadth.
        auto_ivf_min: ``auto`` uses IVF from this many items on.
        exact_filter_below: filtered searches whose allowed set is smaller than this run
            exactly over the allowed rows (IVF would miss items outside probed cells).
        threads: FAISS OpenMP threads (0 leaves FAISS's default).
        train_sample: IVF k-means trains on at most this many random vectors (None: all;
            FAISS itself caps at 256 per cell); every vector is still added to the index.
    """

    kind: str = "auto"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    auto_ivf_min: int = 50_000
    exact_filter_below: int = 4096
    threads: int = 0
    train_sample: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.nprobe <= 0 or (self.nlist is not None and self.nlist <= 0):
            raise ValueError("nprobe and nlist must be positive")
        if self.train_sample is not None and self.train_sample <= 0:
            raise ValueError(f"train_sample must be positive or None, got {self.train_sample}")


class _RWLock:
    """Many readers or one writer (writers are not starved: new readers wait for a queued writer)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Store:
    """Id -> vector copy beside the FAISS index (exact search, payload features, rebuilds).

    Append-only rows with tombstones, so add/remove cost O(batch), not O(corpus).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vecs = np.zeros((0, dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)
        self.n = 0
        self.row_of: dict[int, int] = {}

    def put(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self.drop(ids)
        need = self.n + len(ids)
        if need > len(self.vecs):
            cap = max(need, 2 * len(self.vecs), 1024)
            self.vecs = np.concatenate([self.vecs[: self.n], np.zeros((cap - self.n, self.dim), np.float32)])
            self.ids = np.concatenate([self.ids[: self.n], np.zeros(cap - self.n, np.int64)])
            self.alive = np.concatenate([self.alive[: self.n], np.zeros(cap - self.n, bool)])
        rows = np.arange(self.n, need)
        self.vecs[rows], self.ids[rows], self.alive[rows] = vecs, ids, True
        self.row_of.update(zip(ids.tolist(), rows.tolist()))
        self.n = need

    def drop(self, ids: np.ndarray) -> int:
        gone = 0
        for i in ids.tolist():
            r = self.row_of.pop(i, None)
            if r is not None:
                self.alive[r] = False
                gone += 1
        return gone

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.alive[: self.n]
        return self.ids[: self.n][m], self.vecs[: self.n][m]

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found mask); missing ids get zero rows."""
        rows = np.fromiter((self.row_of.get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))
        found = rows >= 0
        out = np.zeros((len(ids), self.dim), np.float32)
        out[found] = self.vecs[rows[found]]
        return out, found


def _exact(ids: np.ndarray, vecs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner product over (ids, vecs), padded with (-inf, -1)."""
    nq = len(queries)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    out = np.full((nq, k), -1, dtype=np.int64)
    if len(ids) == 0:
        return scores, out
    sims = queries @ vecs.T
    kk = min(k, len(ids))
    part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    ps = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    scores[:, :kk] = np.take_along_axis(sims, top, axis=1)
    out[:, :kk] = ids[top]
    return scores, out


class ItemIndex:
    """Inner-product top-k over items with raw int64 ids.

    Args:
        dim: vector width.
        config: index kind and search knobs.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.config = config or IndexConfig()
        if self.config.threads:
            faiss.omp_set_num_threads(self.config.threads)
        self._lock = _RWLock()
        self._index, self._store, self._kind = self._make(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        self.generation = 0

    # -- construction ----------------------------------------------------------------
    def _choose(self, n: int) -> str:
        kind = self.config.kind
        if kind == "auto":
            kind = "ivf" if n >= self.config.auto_ivf_min else "flat"
        if kind == "ivf" and n < 39 * 16:
            log.info("ivf needs >= %d vectors to train; using flat for %d", 39 * 16, n)
            kind = "flat"
        return kind

    def _nlist(self, n: int) -> int:
        if self.config.nlist is not None:
            return min(self.config.nlist, max(1, n // 39))
        return int(np.clip(4 * np.sqrt(n), 16, max(16, n // 39)))

    def _make(self, ids: np.ndarray, vecs: np.ndarray) -> tuple[faiss.Index, _Store, str]:
        kind = self._choose(len(ids))
        d = self.dim
        if kind == "flat":
            index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.config.ef_search
            index = faiss.IndexIDMap2(inner)
        else:
            index = faiss.index_factory(d, f"IVF{self._nlist(len(ids))},Flat", faiss.METRIC_INNER_PRODUCT)
            train = vecs
            if self.config.train_sample is not None and len(vecs) > self.config.train_sample:
                pick = np.random.default_rng(0).choice(len(vecs), self.config.train_sample, replace=False)
                train = vecs[np.sort(pick)]
            index.train(train)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.nprobe = self.config.nprobe
        store = _Store(d)
        if len(ids):
            index.add_with_ids(vecs, ids)
            store.put(ids, vecs)
        return index, store, kind

    @staticmethod
    def _check(ids: np.ndarray, vecs: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        vecs = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))
        if vecs.ndim != 2 or vecs.shape[1] != dim or len(vecs) != len(ids):
            raise ValueError(f"expected ({len(ids)}, {dim}) vectors for {len(ids)} ids, got {vecs.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate item ids")
        if not np.isfinite(vecs).all():
            raise ValueError("non-finite item vectors")
        return ids, vecs

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Build a fresh index from (ids, vectors) off the hot path, then swap it in."""
        ids, vectors = self._check(ids, vectors, self.dim)
        self.swap(self._make(ids, vectors))

    def swap(self, new: "tuple[faiss.Index, _Store, str] | ItemIndex") -> None:
        """Atomically replace the served index (another ``ItemIndex`` or a ``_make`` result)."""
        if isinstance(new, ItemIndex):
            if new.dim != self.dim:
                raise ValueError(f"cannot swap in an index of dim {new.dim} (this one has {self.dim})")
            with new._lock.read():
                new = (new._index, new._store, new._kind)
        with self._lock.write():
            self._index, self._store, self._kind = new
            self.generation += 1
        log.info("index swapped: %s with %d items (generation %d)", self._kind, self._index.ntotal, self.generation)

    def set_nprobe(self, nprobe: int) -> None:
        """Change IVF cells probed per query on the live index (recall/speed knob; no rebuild)."""
        if nprobe <= 0:
            raise ValueError(f"nprobe must be positive, got {nprobe}")
        from dataclasses import replace

        with self._lock.write():
            self.config = replace(self.config, nprobe=int(nprobe))
            if self._kind == "ivf":
                faiss.extract_index_ivf(self._index).nprobe = int(nprobe)

    # -- mutation --------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace items (new items, streams that went live)."""
        ids, vectors = self._check(ids, vectors, self.dim)
        if len(ids) == 0:
            return
        with self._lock.write():
            if self._kind == "hnsw" and np.isin(ids, self._store.ids[: self._store.n][self._store.alive[: self._store.n]]).any():
                self._rebuild_locked(remove=ids, add=(ids, vectors))
                return
            if self._kind != "hnsw":
                self._remove_locked(ids)
            self._index.add_with_ids(vectors, ids)
            self._store.put(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        """Remove items by id; returns how many were present. HNSW: rebuilds (cannot remove)."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        if len(ids) == 0:
            return 0
        with self._lock.write():
            if self._kind == "hnsw":
                return self._rebuild_locked(remove=ids)
            self._remove_locked(ids)
            return self._store.drop(ids)

    def _remove_locked(self, ids: np.ndarray) -> None:
        # IVF's hashtable direct map only removes through an IDSelectorArray
        sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
        self._index.remove_ids(sel)

    def _rebuild_locked(self, remove: np.ndarray, add: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        gone = self._store.drop(remove)
        ids, vecs = self._store.live()
        if add is not None:
            ids, vecs = np.concatenate([ids, add[0]]), np.concatenate([vecs, add[1]])
        self._index, self._store, self._kind = self._make(ids, vecs)
        return gone

    # -- queries ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        return self._kind

    def ids(self) -> np.ndarray:
        """Ids currently indexed."""
        with self._lock.read():
            return self._store.live()[0].copy()

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found mask) of items by id (zeros where missing)."""
        with self._lock.read():
            return self._store.get(np.asarray(ids, dtype=np.int64).ravel())

    def _queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {q.shape}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        return q

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, blocked: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query, best first; missing slots are (-inf, -1).

        Args:
            queries: (n, dim) float32 (a single (dim,) vector is accepted).
            k: results per query.
            allowed: only these ids may be returned (e.g. live streams); None: all.
            blocked: these ids may not be returned (e.g. offline streams, seen items); cheaper
                than ``allowed`` when few items are excluded from a large corpus.
        """
        q = self._queries(queries, k)
        with self._lock.read():
            if blocked is not None and len(blocked):
                blocked = np.ascontiguousarray(np.asarray(blocked, dtype=np.int64).ravel())
                if allowed is not None:
                    allowed = np.setdiff1d(np.asarray(allowed, dtype=np.int64), blocked)
                else:
                    inner = faiss.IDSelectorBatch(blocked)  # kept alive while the Not selector is used
                    return self._search_sel(q, k, faiss.IDSelectorNot(inner))
            if allowed is not None:
                allowed = np.ascontiguousarray(np.asarray(allowed, dtype=np.int64).ravel())
                if len(allowed) < self.config.exact_filter_below:
                    vecs, found = self._store.get(allowed)
                    return _exact(allowed[found], vecs[found], q, k)
                return self._search_sel(q, k, faiss.IDSelectorBatch(allowed))
            scores, ids = self._index.search(q, k)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def _search_sel(self, q: np.ndarray, k: int, sel: faiss.IDSelector) -> tuple[np.ndarray, np.ndarray]:
        """Filtered FAISS search (caller holds the read lock)."""
        if self._kind == "ivf":
            params: faiss.SearchParameters = faiss.SearchParametersIVF(sel=sel, nprobe=self.config.nprobe)
        elif self._kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.config.ef_search)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self._index.search(q, k, params=params)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def exact_search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` over the stored vectors (ground truth for recall)."""
        q = self._queries(queries, k)
        with self._lock.read():
            ids, vecs = self._store.live()
            if allowed is not None:
                m = np.isin(ids, allowed)
                ids, vecs = ids[m], vecs[m]
            return _exact(ids, vecs, q, k)

    # -- shipping ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The index and its id/vector store as bytes (``faiss.serialize_index`` + npz)."""
        with self._lock.read():
            blob = faiss.serialize_index(self._index)
            ids, vecs = self._store.live()
            buf = io.BytesIO()
            np.savez(buf, index=blob, ids=ids, vecs=vecs, kind=np.array(self._kind))
        return buf.getvalue()

    def __getstate__(self) -> dict[str, object]:
        """Pickle as ``to_bytes`` (FAISS indexes and locks do not pickle): checkpoints of the
        cloud and of a strategy's server side hold an index."""
        return {"blob": self.to_bytes(), "config": self.config, "generation": self.generation}

    def __setstate__(self, state: dict[str, object]) -> None:
        other = ItemIndex.from_bytes(state["blob"], state["config"])  # type: ignore[arg-type]
        self.__dict__.update(other.__dict__)
        self.generation = int(state["generation"])  # type: ignore[call-overload]

    @classmethod
    def from_bytes(cls, data: bytes, config: IndexConfig | None = None) -> "ItemIndex":
        """Inverse of ``to_bytes``."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            index = faiss.deserialize_index(z["index"])
            ids, vecs, kind = z["ids"], z["vecs"], str(z["kind"])
        out = cls(vecs.shape[1], config)
        store = _Store(vecs.shape[1])
        store.put(ids, vecs)
        if kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = out.config.nprobe
        out.swap((index, store, kind))
        return out
