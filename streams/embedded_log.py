"""A durable, file-backed, append-only log with Kafka-like topics, offsets and groups.

Why: tests, demos and single-machine runs need the same produce/consume/commit
semantics as Kafka without a broker. Layout under ``root``::

    <topic>/meta.json               {"partitions": n}
    <topic>/<partition>.log         framed records, appended with O_APPEND
    _groups/<group>/<topic>.json    {"offsets": {"<partition>": next_offset}}

Frame (little-endian)::

    length:u32 | crc32:u32 | ts_ms:i64 | keylen:i32 (-1 = no key) | key | value

``length`` counts the bytes after the crc (ts + keylen + key + value); the crc
covers the same bytes. Offsets are the record index within a partition. On open
every partition is scanned once into an offset -> file-position index; a torn
tail (partial frame, bad crc on the last frame, or zero fill) is truncated with
a warning. A bad frame with any valid frame after it (a flipped length byte, say)
is not a torn tail: the log refuses to open with an error naming the byte and the
salvage command (``python -m streams.embedded_log salvage <root or .log file>``,
or ``salvage_partition``), and never truncates acknowledged records.

Each frame is written with one ``os.write`` on an ``O_APPEND`` descriptor, so a
process killed with SIGKILL leaves at most one torn frame, and several
processes may append to the same partition without interleaving.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Mapping

import numpy as np

from streams.transport import Consumer, Record, Transport, TransportError, partition_for

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<IIqi")  # length, crc, ts_ms, keylen
_HEAD: Final[int] = 8  # length + crc; the crc covers everything after it
#: One record may not exceed this (a corrupt length field must not make us read GBs).
MAX_RECORD_BYTES: Final[int] = 64 * 1024 * 1024
#: A poll reads at most about this many bytes from one partition at once.
MAX_READ_BYTES: Final[int] = 8 * 1024 * 1024
#: Bytes read per step when indexing appends by other processes (>= one largest frame).
_REFRESH_CHUNK: Final[int] = MAX_RECORD_BYTES + 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: How often a waiting consumer looks at the files for appends by other processes.
_TAIL_INTERVAL_S: Final[float] = 0.02


def _check_name(kind: str, name: str) -> str:
    """Topic and group names become path parts, so only a safe alphabet is allowed."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise TransportError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_', '-' (not leading)")
    return name


def _encode_frame(value: bytes, key: bytes | None, ts_ms: int) -> bytes:
    keylen = -1 if key is None else len(key)
    body = struct.pack("<qi", ts_ms, keylen) + (key or b"") + value
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def _atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass
class _ScanResult:
    positions: list[int]
    end: int  # position after the last valid frame
    bad_at: int | None  # position of an invalid frame, if any
    bad_reason: str = ""


def _scan(buf: memoryview, start: int, base: int) -> _ScanResult:
    """Index complete, valid frames in ``buf`` (file bytes from position ``base``) from ``start``."""
    positions: list[int] = []
    pos = start
    n = len(buf)
    unpack = struct.unpack_from
    crc32 = zlib.crc32
    while pos + _FRAME.size <= n:
        length, crc = unpack("<II", buf, pos)
        if length < _FRAME.size - _HEAD or length > MAX_RECORD_BYTES:
            return _ScanResult(positions, base + pos, base + pos, f"frame length {length} out of range")
        end = pos + _HEAD + length
        if end > n:
            break  # partial frame: caller decides (torn tail, or a write still in progress)
        if crc32(buf[pos + _HEAD : end]) != crc:
            return _ScanResult(positions, base + pos, base + pos, "crc mismatch")
        keylen = unpack("<i", buf, pos + 16)[0]
        if keylen < -1 or keylen > length - (_FRAME.size - _HEAD):
            return _ScanResult(positions, base + pos, base + pos, f"key length {keylen} out of range")
        positions.append(base + pos)
        pos = end
    return _ScanResult(positions, base + pos, None)


def _next_valid_frame(buf: memoryview, start: int) -> int | None:
    """Position of the first complete, crc-valid frame at or after ``start`` (None if none).

    Candidate positions are filtered with numpy (plausible length that fits the buffer,
    plausible key length) before any crc is computed, so scanning a torn tail stays cheap.
    """
    n = len(buf)
    last = n - _FRAME.size  # last position where a header fits
    if start > last:
        return None
    raw = np.frombuffer(buf, dtype=np.uint8)
    pos = np.arange(start, last + 1, dtype=np.int64)

    def u32(at: np.ndarray) -> np.ndarray:
        return (raw[at].astype(np.uint32) | (raw[at + 1].astype(np.uint32) << 8)
                | (raw[at + 2].astype(np.uint32) << 16) | (raw[at + 3].astype(np.uint32) << 24))  # fmt: skip

    length = u32(pos).astype(np.int64)
    ok = (length >= _FRAME.size - _HEAD) & (length <= MAX_RECORD_BYTES) & (pos + _HEAD + length <= n)
    pos, length = pos[ok], length[ok]
    keylen = u32(pos + 16).astype(np.int64)
    keylen = np.where(keylen >= 2**31, keylen - 2**32, keylen)
    ok = (keylen >= -1) & (keylen <= length - (_FRAME.size - _HEAD))
    for p, ln in zip(pos[ok].tolist(), length[ok].tolist()):
        crc = struct.unpack_from("<I", buf, p + 4)[0]
        if zlib.crc32(buf[p + _HEAD : p + _HEAD + ln]) == crc:
            return int(p)
    return None


@dataclass(frozen=True)
class SalvageReport:
    """What ``salvage_partition`` kept and skipped.

    Args:
        path: the partition file read; out: the file written.
        records: valid records copied; skipped: (start, end) byte ranges left out.
    """

    path: Path
    out: Path
    records: int
    skipped: list[tuple[int, int]]

    @property
    def skipped_bytes(self) -> int:
        return sum(e - s for s, e in self.skipped)


def salvage_partition(path: Path | str, out: Path | str | None = None, replace: bool = False) -> SalvageReport:
    """Copy every valid frame of a corrupt partition file, skipping only the bad bytes.

    Args:
        path: a ``<partition>.log`` file (no process may have it open).
        out: where to write (default ``<path>.salvaged``).
        replace: keep the original as ``<path>.corrupt`` and move the salvaged file in its place.

    Offsets after a skipped range shift down by the records lost there; consumer groups that
    committed past the damage should be reset (the report says where it was).
    """
    path = Path(path)
    dst = Path(out) if out is not None else path.with_name(path.name + ".salvaged")
    data = path.read_bytes()
    buf = memoryview(data)
    pos, kept, skipped = 0, 0, []
    with open(dst, "wb") as fh:
        while pos < len(data):
            res = _scan(buf, pos, 0)
            if res.positions:
                fh.write(data[res.positions[0] : res.end])
                kept += len(res.positions)
            if res.end >= len(data):
                break
            nxt = _next_valid_frame(buf, res.end + 1)
            skipped.append((res.end, len(data) if nxt is None else nxt))
            if nxt is None:
                break
            pos = nxt
        fh.flush()
        os.fsync(fh.fileno())
    buf.release()
    if replace:
        os.replace(path, path.with_name(path.name + ".corrupt"))
        os.replace(dst, path)
        dst = path
    for a, b in skipped:
        log.warning("%s: salvage skipped bytes %d..%d", path, a, b)
    return SalvageReport(path, dst, kept, skipped)


class _Partition:
    """One partition file: an append descriptor, a read descriptor and the position index."""

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync
        self.lock = threading.Lock()
        self._index = np.zeros(1024, dtype=np.int64)
        self.count = 0
        self.end = 0  # file position after the last indexed frame
        self.dirty = False
        if not path.exists():
            path.touch()
        self.wfd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.rfd = os.open(path, os.O_RDONLY)
        try:
            # Only a process that has the file to itself may truncate a torn tail: for anyone
            # else a partial frame at the end may be another writer's append in progress.
            try:
                fcntl.flock(self.wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                exclusive = True
            except BlockingIOError:
                exclusive = False
            self._recover(exclusive)
            fcntl.flock(self.wfd, fcntl.LOCK_SH)
        except BaseException:
            os.close(self.wfd)
            os.close(self.rfd)
            raise

    # -- index ----------------------------------------------------------------
    def _append_positions(self, positions: list[int] | np.ndarray) -> None:
        k = len(positions)
        if self.count + k > len(self._index):
            cap = max(len(self._index) * 2, self.count + k)
            grown = np.zeros(cap, dtype=np.int64)
            grown[: self.count] = self._index[: self.count]
            self._index = grown
        self._index[self.count : self.count + k] = positions
        self.count += k

    def position(self, offset: int) -> int:
        return int(self._index[offset]) if offset < self.count else self.end

    def _scan_file(self) -> tuple[_ScanResult, int, bool]:
        """(scan, file size, whether what follows the last good frame is just a torn write)."""
        with open(self.path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return _ScanResult([], 0, None), 0, True
            # mmap: a large log is scanned without holding a copy of it in memory.
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    size = len(view)
                    result = _scan(view, 0, 0)
                    torn = result.bad_at is None  # a partial frame at the very end
                    if not torn:
                        length = struct.unpack_from("<I", view, result.end)[0] if size - result.end >= 4 else 0
                        frame_end = result.end + _HEAD + length
                        # The last frame with a bad crc (maybe followed by zero fill after a crash) is torn.
                        torn = frame_end >= size or view[frame_end:].tobytes().count(0) == size - frame_end
                    if torn and result.end < size:
                        # Torn only if nothing valid follows: a flipped length byte mid-file also
                        # looks like a frame running past the end, but valid frames come after it.
                        later = _next_valid_frame(view, result.end + 1)
                        if later is not None:
                            torn = False
                            result.bad_reason = (result.bad_reason or "frame runs past the end") + f"; a valid frame follows at byte {later}"
                finally:
                    view.release()
        return result, size, torn

    def _recover(self, exclusive: bool) -> None:
        """Scan the whole file once; truncate a torn tail, refuse mid-file corruption."""
        result, size, torn = self._scan_file()
        if not exclusive:
            # Shared with a live writer: give an in-progress append a moment to land.
            for _ in range(50):
                if result.end == size:
                    break
                time.sleep(0.02)
                result, size, torn = self._scan_file()
        self._append_positions(np.asarray(result.positions, dtype=np.int64))
        self.end = result.end
        if result.end == size:
            return
        if not torn:
            raise TransportError(
                f"{self.path}: corrupt frame at byte {result.end} ({result.bad_reason}) followed by "
                f"{size - result.end} more bytes; refusing to truncate a log that is not just torn at the tail. "
                f"Stop every process using it, then salvage: python -m streams.embedded_log salvage {self.path}"
            )
        if not exclusive:
            raise TransportError(
                f"{self.path}: torn tail at byte {result.end} but another process has the log open; "
                "reopen once that process has stopped so the tail can be truncated safely"
            )
        log.warning(
            "%s: truncating torn tail of %d bytes at byte %d (%s); %d records kept",
            self.path, size - result.end, result.end, result.bad_reason or "partial frame", self.count,
        )
        with open(self.path, "r+b") as fh:
            fh.truncate(result.end)
            fh.flush()
            os.fsync(fh.fileno())

    def refresh(self) -> None:
        """Index frames appended by other processes (caller holds ``lock``)."""
        size = os.fstat(self.rfd).st_size
        if size <= self.end:
            return
        while self.end < size:  # in bounded chunks: another process may have written a lot
            buf = os.pread(self.rfd, min(size - self.end, _REFRESH_CHUNK), self.end)
            result = _scan(memoryview(buf), 0, self.end)
            self._append_positions(result.positions)
            progressed = result.end > self.end
            self.end = result.end
            if result.bad_at is not None:
                raise TransportError(f"{self.path}: corrupt frame at byte {result.bad_at} ({result.bad_reason})")
            if not progressed:
                break  # a frame still being written

    # -- io -------------------------------------------------------------------
    def append(self, frame: bytes) -> None:
        with self.lock:
            try:
                written = os.write(self.wfd, frame)
            except OSError as exc:  # nothing was written (e.g. ENOSPC before any byte)
                raise TransportError(f"{self.path}: append failed: {exc}") from exc
            if written != len(frame):
                # Disk full mid-frame: cut the partial frame now, so later appends do not
                # land behind garbage (which the next open would refuse as corruption).
                torn_at = os.lseek(self.wfd, 0, os.SEEK_CUR) - written
                try:
                    os.ftruncate(self.wfd, torn_at)
                except OSError as exc:
                    log.error("%s: could not cut a partial frame at byte %d: %s", self.path, torn_at, exc)
                raise TransportError(f"{self.path}: short write ({written} of {len(frame)} bytes, disk full?)")
            start = os.lseek(self.wfd, 0, os.SEEK_CUR) - len(frame)
            if start == self.end:
                self._append_positions([start])
                self.end = start + len(frame)
            else:  # another process appended in between: index its frames too
                self.refresh()
            self.dirty = True

    def sync(self) -> None:
        with self.lock:
            if self.dirty and self.fsync:
                os.fsync(self.wfd)
            self.dirty = False

    def read(self, offset: int, max_records: int, topic: str, partition: int) -> list[Record]:
        with self.lock:
            if offset >= self.count:
                self.refresh()
            if offset >= self.count:
                return []
            last = min(self.count, offset + max_records)
            start = int(self._index[offset])
            # Stop early when the byte range gets large, but always read one record.
            stop_at = np.searchsorted(self._index[offset + 1 : last], start + MAX_READ_BYTES, side="right")
            last = offset + 1 + int(stop_at)
            end = self.position(last)
        buf = os.pread(self.rfd, end - start, start)
        if len(buf) != end - start:
            raise TransportError(f"{self.path}: short read at byte {start} (file truncated underneath?)")
        out: list[Record] = []
        mv = memoryview(buf)
        pos = 0
        for off in range(offset, last):
            length, crc, ts_ms, keylen = _FRAME.unpack_from(mv, pos)
            body_end = pos + _HEAD + length
            if zlib.crc32(mv[pos + _HEAD : body_end]) != crc:
                raise TransportError(f"{self.path}: crc mismatch reading offset {off}")
            kstart = pos + _FRAME.size
            key = None if keylen < 0 else bytes(mv[kstart : kstart + keylen])
            value = bytes(mv[kstart + max(keylen, 0) : body_end])
            out.append(Record(topic, partition, off, key, value, ts_ms))
            pos = body_end
        return out

    def close(self) -> None:
        with self.lock:
            for fd in (self.wfd, self.rfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.wfd = self.rfd = -1


class EmbeddedLog(Transport):
    """File-backed transport with Kafka's produce/consume/commit semantics.

    Args:
        root: directory holding topics and consumer-group offsets (created if absent).
        fsync: fsync partition files on ``flush()`` and after every commit, for
            durability against power loss (process crashes are covered without it).
    """

    def __init__(self, root: Path | str, fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._topics: dict[str, list[_Partition]] = {}
        self._appended = threading.Condition()
        self._closed = False

    # -- topics ---------------------------------------------------------------
    def _meta_path(self, topic: str) -> Path:
        return self.root / _check_name("topic", topic) / "meta.json"

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        self._check_open()
        if int(partitions) < 1:
            raise TransportError(f"topic {topic!r} needs at least one partition, got {partitions}")
        meta = self._meta_path(topic)
        with self._lock:
            if meta.exists():
                existing = self._read_meta(topic)
                if existing != partitions:
                    log.info("topic %s exists with %d partitions (asked for %d)", topic, existing, partitions)
                return
            meta.parent.mkdir(parents=True, exist_ok=True)
            for p in range(partitions):
                (meta.parent / f"{p}.log").touch()
            _atomic_write(meta, json.dumps({"partitions": int(partitions)}).encode(), fsync=self.fsync)
        log.debug("created topic %s with %d partitions", topic, partitions)

    def _read_meta(self, topic: str) -> int:
        meta = self._meta_path(topic)
        try:
            n = json.loads(meta.read_bytes())["partitions"]
        except FileNotFoundError:
            raise TransportError(f"topic {topic!r} does not exist under {self.root}; call create_topic first") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"{meta}: unreadable topic metadata ({exc})") from None
        if not isinstance(n, int) or n < 1:
            raise TransportError(f"{meta}: invalid partition count {n!r}")
        return n

    def partitions(self, topic: str) -> int:
        self._check_open()
        return len(self._open_topic(topic))

    def topics(self) -> list[str]:
        """Names of existing topics."""
        return sorted(p.parent.name for p in self.root.glob("*/meta.json"))

    def _open_topic(self, topic: str) -> list[_Partition]:
        parts = self._topics.get(topic)
        if parts is not None:
            return parts
        with self._lock:
            parts = self._topics.get(topic)
            if parts is None:
                n = self._read_meta(topic)
                parts = [_Partition(self.root / topic / f"{p}.log", self.fsync) for p in range(n)]
                self._topics[topic] = parts
        return parts

    # -- produce --------------------------------------------------------------
    def produce(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        self._check_open()
        parts = self._open_topic(topic)
        if partition is None:
            partition = 0 if key is None else partition_for(key, len(parts))
        if not 0 <= partition < len(parts):
            raise TransportError(f"topic {topic!r} has {len(parts)} partitions; no partition {partition}")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TransportError(f"record value must be bytes, got {type(value).__name__}")
        if len(value) > MAX_RECORD_BYTES:
            raise TransportError(f"record of {len(value)} bytes exceeds the limit of {MAX_RECORD_BYTES}")
        parts[partition].append(_encode_frame(bytes(value), key, int(time.time() * 1000)))
        with self._appended:
            self._appended.notify_all()

    def flush(self) -> None:
        """Writes go straight to the OS; with ``fsync=True`` this also forces them to disk."""
        self._check_open()
        for parts in list(self._topics.values()):
            for part in parts:
                part.sync()

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Offset after the last record of every partition."""
        out = {}
        for p, part in enumerate(self._open_topic(topic)):
            with part.lock:
                part.refresh()
                out[p] = part.count
        return out

    # -- consume --------------------------------------------------------------
    def consumer(self, topic: str, group: str, partitions: list[int] | None = None) -> "EmbeddedConsumer":
        """A reader of ``topic`` for ``group``.

        There is no rebalancing: with ``partitions=None`` the consumer reads every
        partition; split work between processes by passing explicit partitions.
        """
        self._check_open()
        return EmbeddedConsumer(self, topic, _check_name("group", group), partitions)

    def _wait_for_append(self, timeout_s: float) -> None:
        with self._appended:
            self._appended.wait(timeout_s)

    def _group_path(self, group: str, topic: str) -> Path:
        return self.root / "_groups" / group / f"{topic}.json"

    def _load_committed(self, group: str, topic: str) -> dict[int, int]:
        path = self._group_path(group, topic)
        try:
            raw = json.loads(path.read_bytes())
            return {int(p): int(o) for p, o in raw["offsets"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransportError(f"{path}: unreadable committed offsets ({exc})") from None

    def _commit(self, group: str, topic: str, offsets: Mapping[int, int]) -> None:
        path = self._group_path(group, topic)
        path.parent.mkdir(parents=True, exist_ok=True)
        # flock: members of one group on different partitions must not lose each other's commits.
        with open(path.with_suffix(".lock"), "a+b") as lockf:
            fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
            current = self._load_committed(group, topic)
            current.update({int(p): int(o) for p, o in offsets.items()})
            data = json.dumps({"offsets": {str(p): o for p, o in sorted(current.items())}}).encode()
            _atomic_write(path, data, fsync=self.fsync)

    # -- lifecycle ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"EmbeddedLog at {self.root} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        for parts in self._topics.values():
            for part in parts:
                part.close()
        self._topics.clear()
        with self._appended:
            self._appended.notify_all()

    def __repr__(self) -> str:
        return f"EmbeddedLog({str(self.root)!r}, fsync={self.fsync})"


class EmbeddedConsumer(Consumer):
    """Reads one topic of an ``EmbeddedLog`` from the group's committed offsets."""

    def __init__(self, log_: EmbeddedLog, topic: str, group: str, partitions: list[int] | None) -> None:
        self._log = log_
        self.topic = topic
        self.group = group
        self._parts = log_._open_topic(topic)
        n = len(self._parts)
        assigned = list(range(n)) if partitions is None else [int(p) for p in partitions]
        bad = [p for p in assigned if not 0 <= p < n]
        if bad or not assigned:
            raise TransportError(f"topic {topic!r} has {n} partitions; cannot assign {partitions}")
        self._assigned = sorted(set(assigned))
        committed = log_._load_committed(group, topic)
        self._pos = {p: committed.get(p, 0) for p in self._assigned}
        self._next = 0  # round-robin start, so one busy partition cannot starve the rest
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise TransportError(f"consumer of {self.topic!r} (group {self.group!r}) is closed")
        self._log._check_open()

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        self._check()
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            out = self._read(max_records)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._log._wait_for_append(min(remaining, _TAIL_INTERVAL_S))
            self._check()

    def _read(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        k = len(self._assigned)
        for i in range(k):
            p = self._assigned[(self._next + i) % k]
            got = self._parts[p].read(self._pos[p], max_records - len(out), self.topic, p)
            if got:
                self._pos[p] = got[-1].offset + 1
                out.extend(got)
            if len(out) >= max_records:
                break
        self._next = (self._next + 1) % k
        return out

    def commit(self, offsets: Mapping[int, int] | None = None) -> None:
        self._check()
        offsets = dict(self._pos) if offsets is None else dict(offsets)
        for p, o in offsets.items():
            if p not in self._pos:
                raise TransportError(f"cannot commit partition {p}: not assigned (assigned {self._assigned})")
            if o < 0:
                raise TransportError(f"cannot commit negative offset {o} for partition {p}")
        self._log._commit(self.group, self.topic, offsets)

    def committed(self) -> dict[int, int]:
        self._check()
        return {p: o for p, o in self._log._load_committed(self.group, self.topic).items() if p in self._pos}

    def positions(self) -> dict[int, int]:
        return dict(self._pos)

    def seek(self, partition: int, offset: int) -> None:
        if partition not in self._pos:
            raise TransportError(f"cannot seek partition {partition}: not assigned (assigned {self._assigned})")
        if offset < 0:
            raise TransportError(f"cannot seek to negative offset {offset}")
        self._pos[partition] = int(offset)

    def seek_to_beginning(self) -> None:
        for p in self._pos:
            self._pos[p] = 0

    def end_offsets(self) -> dict[int, int]:
        self._check()
        ends = self._log.end_offsets(self.topic)
        return {p: ends[p] for p in self._assigned}

    def assignment(self) -> list[int]:
        """Partitions this consumer reads."""
        return list(self._assigned)

    def close(self) -> None:
        self._closed = True


def _main(argv: list[str] | None = None) -> int:
    """``python -m streams.embedded_log salvage PATH [--replace]``: PATH is a log root or one .log file."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m streams.embedded_log", description="Embedded log tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("salvage", help="copy the valid frames of corrupt partitions, skipping only bad bytes")
    sp.add_argument("path", type=Path, help="a log root (every topic) or one <partition>.log file")
    sp.add_argument("--replace", action="store_true", help="keep originals as .corrupt and put salvaged files in place")
    args = ap.parse_args(argv)
    if not args.path.exists():
        ap.exit(2, f"error: {args.path} does not exist\n")
    files = [args.path] if args.path.is_file() else sorted(args.path.glob("*/*.log"))
    damaged = 0
    for f in files:
        data = f.read_bytes()
        res = _scan(memoryview(data), 0, 0)
        if res.end == len(data):
            continue
        damaged += 1
        rep = salvage_partition(f, replace=args.replace)
        print(f"{f}: kept {rep.records} records, skipped {rep.skipped_bytes} bytes at {rep.skipped} -> {rep.out}")
    print(f"{len(files)} partition files checked, {damaged} salvaged")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
