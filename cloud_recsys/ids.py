"""Raw int64 ids -> dense embedding rows, assigned online.

Why: ids on the wire are arbitrary int64 values (MovieLens movie ids, stream
ids); embedding tables need dense rows ``0..capacity-1``. New ids appear while
the stream runs, so rows are handed out in order of first sight.

Overflow policy (documented choice): once ``capacity`` ids are mapped, further
new ids map to the shared ``overflow_row`` (== ``capacity``) when
``overflow="shared"`` (default; tables therefore have ``capacity + 1`` rows and
the overflow row learns a generic "new id" embedding), or raise
``IdMapFull`` when ``overflow="raise"``. Overflows are counted and logged once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class IdMapFull(RuntimeError):
    """A new id arrived after the map reached its capacity (``overflow="raise"``)."""


class IdMap:
    """Vectorized raw id -> dense row map that grows online up to ``capacity``.

    Args:
        capacity: most distinct ids that get their own row.
        overflow: "shared" (new ids past capacity share row ``capacity``) or "raise".
    """

    def __init__(self, capacity: int, overflow: str = "shared") -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if overflow not in ("shared", "raise"):
            raise ValueError(f"overflow must be 'shared' or 'raise', got {overflow!r}")
        self.capacity = int(capacity)
        self.overflow = overflow
        self.overflowed = 0
        self._keys = np.empty(0, dtype=np.int64)  # sorted raw ids
        self._rows = np.empty(0, dtype=np.int64)  # row of each sorted key
        self._raw = np.empty(0, dtype=np.int64)  # raw id of each row (row order)

    @property
    def overflow_row(self) -> int:
        """Row shared by ids that arrived after the map was full."""
        return self.capacity

    @property
    def num_rows(self) -> int:
        """Rows an embedding table needs: ``capacity`` + the shared overflow row."""
        return self.capacity + 1

    def __len__(self) -> int:
        return len(self._raw)

    def raw_ids(self) -> np.ndarray:
        """Raw id of every assigned row, in row order (a copy)."""
        return self._raw.copy()

    def _find(self, raw: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._keys, raw)
        pos_c = np.minimum(pos, max(len(self._keys) - 1, 0))
        hit = (pos < len(self._keys)) & (self._keys[pos_c] == raw) if len(self._keys) else np.zeros(len(raw), bool)
        out = np.full(len(raw), -1, dtype=np.int64)
        out[hit] = self._rows[pos_c[hit]]
        return out

    def lookup(self, raw: np.ndarray, add: bool = False) -> np.ndarray:
        """Rows of ``raw`` ids; unknown ids get -1, or new rows when ``add`` is True.

        Args:
            raw: int64 raw ids (any shape is flattened).
            add: assign rows to unseen ids (in order of first appearance).
        """
        raw = np.asarray(raw, dtype=np.int64).ravel()
        rows = self._find(raw)
        if not add:
            return rows
        missing = rows < 0
        if not missing.any():
            return rows
        new, first = np.unique(raw[missing], return_index=True)
        new = new[np.argsort(first, kind="stable")]  # first-sight order: deterministic rows
        room = self.capacity - len(self._raw)
        if len(new) > room:
            extra = len(new) - room
            if self.overflow == "raise":
                raise IdMapFull(f"IdMap full: {extra} new ids past capacity {self.capacity}")
            if self.overflowed == 0:
                log.warning("IdMap reached capacity %d; new ids share overflow row %d", self.capacity, self.capacity)
            self.overflowed += extra
            new = new[:room]
        if len(new):
            rows_new = np.arange(len(self._raw), len(self._raw) + len(new), dtype=np.int64)
            self._raw = np.concatenate([self._raw, new])
            keys = np.concatenate([self._keys, new])
            order = np.argsort(keys, kind="stable")
            self._keys = keys[order]
            self._rows = np.concatenate([self._rows, rows_new])[order]
        rows = self._find(raw)
        rows[rows < 0] = self.overflow_row
        return rows

    def to_raw(self, rows: np.ndarray) -> np.ndarray:
        """Raw ids of dense rows (-1 for the overflow row or out-of-range rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        ok = (rows >= 0) & (rows < len(self._raw))
        out = np.full(rows.shape, -1, dtype=np.int64)
        out[ok] = self._raw[rows[ok]]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "overflow": self.overflow, "overflowed": self.overflowed, "raw": self._raw.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.overflow = str(state["overflow"])
        self.overflowed = int(state["overflowed"])
        self._raw = np.asarray(state["raw"], dtype=np.int64).copy()
        order = np.argsort(self._raw, kind="stable")
        self._keys = self._raw[order]
        self._rows = order.astype(np.int64)
