"""When devices upload: triggering policies (save traffic) and connectivity windows.

A policy answers "is this update worth sending now?"; a window answers "may
this device use the network now?" (Wi-Fi and charging). The fleet uploads only
when both say yes. One policy object serves a whole fleet: per-device state is
kept inside, keyed by device id and update family (``family``: a strategy that sends
interest vectors after engagements and parameter deltas at fetches gates each against
its own last upload; with one shared memory the frequent family would starve the other).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass

import numpy as np

_DAY_MS = 86_400_000


class UploadPolicy(abc.ABC):
    """Decides whether a device should upload now."""

    @abc.abstractmethod
    def should_upload(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> bool: ...

    def mark_sent(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> None:
        """Called after an upload (of ``family``; "" = all families together) was sent."""


class AlwaysUpload(UploadPolicy):
    """Every opportunity (the traffic baseline)."""

    def should_upload(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> bool:
        return True


class PeriodicUpload(UploadPolicy):
    """At most once every ``every_ms`` per device."""

    def __init__(self, every_ms: int) -> None:
        self.every_ms = every_ms
        self._last: dict[tuple[int, str], int] = {}

    def should_upload(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> bool:
        last = self._last.get((device_id, family))
        return last is None or now_ms - last >= self.every_ms

    def mark_sent(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> None:
        self._last[(device_id, family)] = now_ms


class DriftTriggered(UploadPolicy):
    """Only when the user's interest vector drifted: cosine distance to the last sent one >= threshold.

    The first upload (nothing sent yet) always passes once an interest vector exists.
    """

    def __init__(self, threshold: float = 0.1) -> None:
        self.threshold = threshold
        self._sent: dict[tuple[int, str], np.ndarray] = {}

    @staticmethod
    def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0 or nb == 0:
            return 1.0
        return 1.0 - float(np.dot(a, b)) / (na * nb)

    def should_upload(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> bool:
        if interest is None:
            return False
        last = self._sent.get((device_id, family))
        return last is None or self.cosine_distance(interest, last) >= self.threshold

    def mark_sent(self, device_id: int, now_ms: int, interest: np.ndarray | None, family: str = "") -> None:
        if interest is not None:
            self._sent[(device_id, family)] = np.array(interest, dtype=np.float32)


@dataclass(frozen=True)
class ConnectivityWindow:
    """Daily windows when a device is on Wi-Fi and charging.

    Args:
        mode: "always", "nightly" (``start_hour``..``start_hour + hours`` in the device's own
            time zone offset, drawn from its id) or "random" (one window per day at a start
            drawn from (seed, device id, day)).
        start_hour: nightly window start (local hour).
        hours: window length.
        seed: mixes into every draw, so runs are reproducible.
    """

    mode: str = "nightly"
    start_hour: float = 1.0
    hours: float = 5.0
    seed: int = 0

    def _draw(self, *parts: int) -> float:
        h = hashlib.blake2b(b"|".join(str(p).encode() for p in (self.seed, *parts)), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64

    def is_open(self, device_id: int, now_ms: int) -> bool:
        if self.mode == "always":
            return True
        if self.mode == "nightly":
            offset_h = int(self._draw(device_id) * 24) - 12  # device time zone, whole hours
            local_h = ((now_ms / 3_600_000.0) + offset_h) % 24.0
            return (local_h - self.start_hour) % 24.0 < self.hours
        if self.mode == "random":
            day = now_ms // _DAY_MS
            start = self._draw(device_id, day) * (24.0 - self.hours)
            h = (now_ms % _DAY_MS) / 3_600_000.0
            return start <= h < start + self.hours
        raise ValueError(f"unknown connectivity mode {self.mode!r}")
