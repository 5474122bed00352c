"""One small interface over event logs: the embedded file log and Kafka.

Both transports move opaque records (bytes, usually an ``EventBatch`` from
streams/batch.py) through partitioned topics with per-partition offsets, and
consumer groups whose committed offsets survive a restart. Delivery is
at-least-once: a consumer commits after it has processed what it polled, and
handlers deduplicate by event id.
"""

from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Record:
    """One record read from a topic partition."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


class TransportError(RuntimeError):
    """The transport cannot do what was asked (broker gone, topic missing, ...)."""


def partition_for(key: int | bytes, partitions: int) -> int:
    """Stable partition of a key (user id): same on every process and run.

    Why not Python's ``hash``: it is salted per process.
    """
    if isinstance(key, int):
        key = key.to_bytes(8, "little", signed=True)
    return zlib.crc32(key) % partitions


class Consumer(abc.ABC):
    """Reads one topic as a member of a consumer group."""

    topic: str
    group: str

    @abc.abstractmethod
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records after the current positions ([] on timeout)."""

    @abc.abstractmethod
    def commit(self, offsets: Mapping[int, int] | None = None) -> None:
        """Commit ``{partition: next offset to read}``; default: the current positions."""

    @abc.abstractmethod
    def committed(self) -> dict[int, int]:
        """The group's committed ``{partition: next offset}`` (missing: none committed)."""

    @abc.abstractmethod
    def positions(self) -> dict[int, int]:
        """The next offset this consumer will read, per assigned partition."""

    @abc.abstractmethod
    def seek(self, partition: int, offset: int) -> None:
        """Move the read position of one partition."""

    @abc.abstractmethod
    def seek_to_beginning(self) -> None:
        """Re-read every assigned partition from its first offset (replay)."""

    @abc.abstractmethod
    def end_offsets(self) -> dict[int, int]:
        """Offset after the last record, per assigned partition (for lag)."""

    def lag(self) -> int:
        """Records not yet read by this consumer."""
        ends = self.end_offsets()
        pos = self.positions()
        return sum(max(0, ends[p] - pos.get(p, 0)) for p in ends)

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources (does not commit)."""

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(abc.ABC):
    """Produce records to, and consume them from, partitioned topics."""

    @abc.abstractmethod
    def create_topic(self, topic: str, partitions: int = 1) -> None:
        """Create a topic if absent (idempotent)."""

    @abc.abstractmethod
    def partitions(self, topic: str) -> int:
        """Number of partitions of an existing topic."""

    @abc.abstractmethod
    def produce(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        """Append one record; with no partition, the key's partition (or 0)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Block until every produced record is durable/acknowledged."""

    @abc.abstractmethod
    def consumer(self, topic: str, group: str, partitions: list[int] | None = None) -> Consumer:
        """A group member reading ``topic`` from the group's committed offsets (earliest if none)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release resources."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
