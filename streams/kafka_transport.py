"""Kafka transport on kafka-python: the same interface as the embedded log, on a real broker.

Why these settings: ``acks='all'`` so an acknowledged record survives a broker
failover; a few milliseconds of ``linger_ms`` and a large ``batch_size`` so the
producer sends few, large requests (Python pays per request, not per byte); no
compression by default because Tandem's batch records are already lz4. Every
client timeout is bounded so a broker that goes away surfaces as a
``TransportError`` with a reason instead of a hang. Only standard client
settings are used, so Apache Kafka, Redpanda and tansu all work.

Keys and partitions: when ``produce`` gets a key and no partition, the partition
is ``streams.transport.partition_for(key, n)`` (not Kafka's murmur2), so a user
lands on the same partition number under every transport.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Mapping

import numpy as np

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from streams.transport import Consumer, Record, Transport, TransportError, partition_for

log = logging.getLogger(__name__)


@dataclass
class KafkaSettings:
    """Client settings Tandem picks; anything in ``producer``/``consumer``/``admin`` overrides them.

    Args:
        linger_ms: how long the producer waits to fill a batch.
        batch_size: bytes per partition batch (large: records are ~10 kB batches of events).
        compression_type: None (records are lz4 already), or "lz4", "gzip", "zstd", ...
        request_timeout_ms: one request to the broker.
        max_block_ms: how long ``produce`` may block on metadata or a full buffer (back-pressure).
        delivery_timeout_ms: how long the producer retries a record before failing it.
        unavailable_timeout_s: a consumer that cannot reach any broker for this long raises.
        max_pending_bytes: unacknowledged bytes after which ``produce`` waits for acks
            (back-pressure; kafka-python 3 has no ``buffer_memory`` bound).
        producer / consumer / admin: raw kafka-python settings merged over the above.
    """

    linger_ms: int = 5
    batch_size: int = 1 << 20
    compression_type: str | None = None
    request_timeout_ms: int = 10_000
    max_block_ms: int = 10_000
    delivery_timeout_ms: int = 30_000
    unavailable_timeout_s: float = 15.0
    max_pending_bytes: int = 64 << 20
    producer: dict[str, Any] = field(default_factory=dict)
    consumer: dict[str, Any] = field(default_factory=dict)
    admin: dict[str, Any] = field(default_factory=dict)


_SETTING_NAMES = {f for f in KafkaSettings.__dataclass_fields__}
_CONSUMER_ONLY = {"max_poll_interval_ms", "session_timeout_ms", "heartbeat_interval_ms", "max_poll_records",
                  "fetch_max_wait_ms", "fetch_min_bytes", "fetch_max_bytes", "max_partition_fetch_bytes",
                  "isolation_level"}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- CRC-32C ------------------------------------------------------------------------------
# kafka-python checksums every record batch with CRC-32C. Without the optional C package
# ``crc32c`` it falls back to a pure-Python loop (~3 MB/s), which caps a producer or consumer
# near 100k events/s. This numpy version (~100 MB/s on large batches) computes the CRCs of
# many chunks in parallel, one byte column at a time, then folds them with precomputed
# "append 2^k zero bytes" operators (CRC is linear over GF(2)). It is installed only when the
# C package is absent, and only after it reproduces the standard check value.
_CRC_POLY: Final[int] = 0x82F63B78  # Castagnoli, reflected


def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_CRC_POLY), t >> 1).astype(np.uint32)
    return t


_CRC_T = _crc_table()
_CRC_T_LIST: list[int] = _CRC_T.tolist()
_CRC_BASIS = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
_Op = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _crc_apply(op: _Op, x: np.ndarray) -> np.ndarray:
    """Apply a GF(2)-linear map on 32-bit registers, given as four byte tables."""
    return op[0][x & 0xFF] ^ op[1][(x >> 8) & 0xFF] ^ op[2][(x >> 16) & 0xFF] ^ op[3][x >> 24]


def _crc_op(images: np.ndarray) -> _Op:
    """Byte tables of the linear map that sends bit i to ``images[i]``."""
    v = np.arange(256, dtype=np.uint32)
    tables = []
    for j in range(4):
        a = np.zeros(256, dtype=np.uint32)
        for i in range(8):
            a ^= np.where((v >> i) & 1, images[8 * j + i], np.uint32(0)).astype(np.uint32)
        tables.append(a)
    return tables[0], tables[1], tables[2], tables[3]


@functools.lru_cache(maxsize=64)
def _crc_zeros_pow2(k: int) -> _Op:
    """The register after feeding 2**k zero bytes, as a linear map."""
    if k == 0:
        return _crc_op(_CRC_T[_CRC_BASIS & 0xFF] ^ (_CRC_BASIS >> 8))
    half = _crc_zeros_pow2(k - 1)
    return _crc_op(_crc_apply(half, _crc_apply(half, _CRC_BASIS)))


def _crc32c_numpy(data: Any) -> int:
    """CRC-32C of a bytes-like object (same result as the ``crc32c`` package)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(buf)
    if n < 1024:
        crc = 0xFFFFFFFF
        table = _CRC_T_LIST
        for b in buf.tobytes():
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    width = 4 if n < 32768 else (16 if n < 262144 else 64)  # powers of two: fold with cached operators
    chunks = -(-n // width)
    padded = np.zeros(chunks * width, dtype=np.uint8)
    padded[chunks * width - n :] = buf  # leading zeros do not change a CRC started from 0
    cols = padded.reshape(chunks, width).T.copy()
    regs = np.zeros(chunks, dtype=np.uint32)
    for j in range(width):
        regs = _CRC_T[(regs ^ cols[j]) & 0xFF] ^ (regs >> 8)
    seg = width
    while len(regs) > 1:
        if len(regs) & 1:
            regs = np.concatenate([np.zeros(1, dtype=np.uint32), regs])
        regs = _crc_apply(_crc_zeros_pow2(seg.bit_length() - 1), regs[0::2]) ^ regs[1::2]
        seg *= 2
    init = np.array([0xFFFFFFFF], dtype=np.uint32)  # the initial register, carried through n bytes
    for bit in range(n.bit_length()):
        if n >> bit & 1:
            init = _crc_apply(_crc_zeros_pow2(bit), init)
    return (int(init[0]) ^ int(regs[0])) ^ 0xFFFFFFFF


def install_fast_crc32c() -> bool:
    """Use the numpy CRC-32C in kafka-python when its C accelerator is missing; True if installed."""
    import kafka.record.default_records as default_records
    import kafka.record.util as record_util

    if getattr(record_util, "crc32c_c", None) is not None:
        return False  # the C package is there and faster
    if default_records.calc_crc32c is _crc32c_numpy:
        return True
    check = bytes(range(256)) * 17
    if _crc32c_numpy(b"123456789") != 0xE3069283 or _crc32c_numpy(check) != record_util.calc_crc32c(memoryview(check)):
        log.warning("numpy CRC-32C failed its self-check; keeping kafka-python's pure-Python CRC")
        return False
    default_records.calc_crc32c = _crc32c_numpy
    log.info("crc32c package not installed: using numpy CRC-32C for Kafka record batches")
    return True


class KafkaTransport(Transport):
    """Transport over a Kafka-protocol cluster.

    Args:
        bootstrap: "host:port[,host:port]".
        client_id: reported to the broker (logs, quotas).
        **client_config: ``KafkaSettings`` fields (``linger_ms=``, ``consumer={...}``, ...),
            ``producer_config``/``consumer_config``/``admin_config`` dicts, or any other
            kafka-python setting, which goes to every client that accepts it
            (e.g. ``security_protocol``, ``sasl_mechanism``).
    """

    def __init__(self, bootstrap: str, client_id: str = "tandem", **client_config: Any) -> None:
        if not bootstrap or not isinstance(bootstrap, str):
            raise ValueError(f"bootstrap must be 'host:port[,host:port]', got {bootstrap!r}")
        self.bootstrap = bootstrap
        self.client_id = client_id
        settings_kw = {k: client_config.pop(k) for k in list(client_config) if k in _SETTING_NAMES}
        self.settings = KafkaSettings(**settings_kw)
        self.settings.producer.update(client_config.pop("producer_config", {}) or {})
        self.settings.consumer.update(client_config.pop("consumer_config", {}) or {})
        self.settings.admin.update(client_config.pop("admin_config", {}) or {})
        consumer_only = {k: client_config.pop(k) for k in list(client_config) if k in _CONSUMER_ONLY}
        self.settings.consumer.update(consumer_only)
        known = set(KafkaProducer.DEFAULT_CONFIG) | set(KafkaConsumer.DEFAULT_CONFIG) | set(KafkaAdminClient.DEFAULT_CONFIG)
        unknown = sorted(set(client_config) - known)
        if unknown:
            raise ValueError(f"unknown Kafka client settings {unknown} (see KafkaSettings and kafka-python's configs)")
        self._common = dict(client_config)  # e.g. security settings, for every client that takes them
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._pending_bytes = 0
        self._partition_counts: dict[str, int] = {}
        self._closed = False
        install_fast_crc32c()

    # -- clients --------------------------------------------------------------
    def _base(self, client: type) -> dict[str, Any]:
        s = self.settings
        accepted = client.DEFAULT_CONFIG  # type: ignore[attr-defined]
        return {
            "bootstrap_servers": self.bootstrap.split(","),
            "client_id": self.client_id,
            "request_timeout_ms": s.request_timeout_ms,
            "bootstrap_timeout_ms": s.request_timeout_ms,
            "reconnect_backoff_max_ms": 2_000,
            **{k: v for k, v in self._common.items() if k in accepted},
        }

    def producer_config(self) -> dict[str, Any]:
        """The settings the producer is built with (for logs and tests)."""
        s = self.settings
        cfg = {
            **self._base(KafkaProducer),
            "acks": "all",
            "linger_ms": s.linger_ms,
            "batch_size": s.batch_size,
            "compression_type": s.compression_type,
            "max_block_ms": s.max_block_ms,
            "delivery_timeout_ms": s.delivery_timeout_ms,
            "max_request_size": max(s.batch_size, 1 << 20),
        }
        cfg.update(s.producer)
        return cfg

    def consumer_config(self, group: str) -> dict[str, Any]:
        """The settings a consumer of ``group`` is built with."""
        cfg = {
            **self._base(KafkaConsumer),
            "group_id": group,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": 100,
        }
        cfg.update(self.settings.consumer)
        return cfg

    def _get_producer(self) -> KafkaProducer:
        self._check_open()
        if self._producer is None:
            with self._lock:
                if self._producer is None:
                    try:
                        self._producer = KafkaProducer(**self.producer_config())
                    except (KafkaError, OSError) as exc:
                        raise TransportError(f"cannot connect producer to {self.bootstrap}: {_describe(exc)}") from exc
        return self._producer

    def _get_admin(self) -> KafkaAdminClient:
        self._check_open()
        if self._admin is None:
            with self._lock:
                if self._admin is None:
                    try:
                        self._admin = KafkaAdminClient(**{**self._base(KafkaAdminClient), **self.settings.admin})
                    except (KafkaError, OSError) as exc:
                        raise TransportError(f"cannot reach Kafka at {self.bootstrap}: {_describe(exc)}") from exc
        return self._admin

    # -- topics ---------------------------------------------------------------
    def create_topic(self, topic: str, partitions: int = 1) -> None:
        if int(partitions) < 1:
            raise TransportError(f"topic {topic!r} needs at least one partition, got {partitions}")
        admin = self._get_admin()
        try:
            admin.create_topics([NewTopic(topic, int(partitions), 1)], timeout_ms=self.settings.request_timeout_ms)
            log.debug("created topic %s with %d partitions", topic, partitions)
        except TopicAlreadyExistsError:
            pass
        except (KafkaError, OSError) as exc:
            raise TransportError(f"cannot create topic {topic!r} on {self.bootstrap}: {_describe(exc)}") from exc
        self._partition_counts.pop(topic, None)

    def partitions(self, topic: str) -> int:
        n = self._partition_counts.get(topic)
        if n is not None:
            return n
        admin = self._get_admin()
        try:
            described = admin.describe_topics([topic])
        except (KafkaError, OSError) as exc:
            raise TransportError(f"cannot describe topic {topic!r} on {self.bootstrap}: {_describe(exc)}") from exc
        if not described or described[0].get("error_code", 0) != 0 or not described[0].get("partitions"):
            raise TransportError(f"topic {topic!r} does not exist on {self.bootstrap}; call create_topic first")
        n = len(described[0]["partitions"])
        self._partition_counts[topic] = n
        return n

    # -- produce --------------------------------------------------------------
    def _on_error(self, exc: BaseException) -> None:
        with self._lock:
            if len(self._errors) < 100:
                self._errors.append(exc)

    def _on_done(self, size: int, _result: object) -> None:
        with self._lock:
            self._pending_bytes -= size

    def produce(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        producer = self._get_producer()
        if partition is None and key is not None:
            partition = partition_for(key, self.partitions(topic))
        try:
            future = producer.send(topic, value=value, key=key, partition=partition)
        except KafkaTimeoutError as exc:
            raise TransportError(
                f"produce to {topic!r} blocked over max_block_ms={self.settings.max_block_ms} "
                f"(broker {self.bootstrap} unreachable, topic missing, or buffer full): {_describe(exc)}"
            ) from exc
        except (KafkaError, AssertionError, TypeError) as exc:
            raise TransportError(f"produce to {topic!r} failed: {_describe(exc)}") from exc
        size = len(value) + (len(key) if key else 0)
        with self._lock:
            self._pending_bytes += size
        future.add_both(self._on_done, size)
        future.add_errback(self._on_error)
        self._raise_errors()
        if self._pending_bytes > self.settings.max_pending_bytes:
            self.flush()  # back-pressure: never buffer without bound

    def _raise_errors(self) -> None:
        if self._errors:
            with self._lock:
                errors, self._errors = self._errors, []
            raise TransportError(
                f"{len(errors)} record(s) could not be delivered to {self.bootstrap}; first: {_describe(errors[0])}"
            )

    def flush(self) -> None:
        if self._producer is None:
            return
        timeout_s = (self.settings.delivery_timeout_ms + self.settings.request_timeout_ms) / 1000
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaTimeoutError as exc:
            raise TransportError(f"flush to {self.bootstrap} not acknowledged within {timeout_s:.0f}s: {_describe(exc)}") from exc
        except KafkaError as exc:
            raise TransportError(f"flush to {self.bootstrap} failed: {_describe(exc)}") from exc
        self._raise_errors()

    # -- consume --------------------------------------------------------------
    def consumer(self, topic: str, group: str, partitions: list[int] | None = None) -> "KafkaTopicConsumer":
        """A group member; ``partitions=None`` joins the group (rebalancing), else a fixed assignment."""
        self._check_open()
        return KafkaTopicConsumer(self, topic, group, partitions)

    # -- lifecycle ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"KafkaTransport to {self.bootstrap} is closed")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._producer is not None:
                try:
                    self._producer.close(timeout=5)
                except Exception as exc:  # closing must not mask the flush error
                    log.warning("producer close failed: %s", _describe(exc))
            if self._admin is not None:
                try:
                    self._admin.close()
                except Exception as exc:
                    log.warning("admin close failed: %s", _describe(exc))

    def __repr__(self) -> str:
        return f"KafkaTransport({self.bootstrap!r}, client_id={self.client_id!r})"


class _SeekOnAssign(ConsumerRebalanceListener):
    """Applies seeks asked for before the group handed us partitions."""

    def __init__(self, owner: "KafkaTopicConsumer") -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner._apply_pending(assigned)


class KafkaTopicConsumer(Consumer):
    """One topic, one group; commits only when asked (at-least-once)."""

    def __init__(self, transport: KafkaTransport, topic: str, group: str, partitions: list[int] | None) -> None:
        self.topic = topic
        self.group = group
        self._transport = transport
        self._pending_beginning = False
        self._pending_seeks: dict[int, int] = {}
        self._unreachable_since: float | None = None
        self._closed = False
        self._timeout_ms = transport.settings.request_timeout_ms
        n = transport.partitions(topic)  # raises TransportError if the topic is missing
        try:
            self._consumer = KafkaConsumer(**transport.consumer_config(group))
        except (KafkaError, OSError) as exc:
            raise TransportError(f"cannot connect consumer to {transport.bootstrap}: {_describe(exc)}") from exc
        self._n = n
        if partitions is None:
            self._fixed: list[int] | None = None
            self._consumer.subscribe([topic], listener=_SeekOnAssign(self))
        else:
            bad = [p for p in partitions if not 0 <= p < n]
            if bad or not partitions:
                self._consumer.close()
                raise TransportError(f"topic {topic!r} has {n} partitions; cannot assign {partitions}")
            self._fixed = sorted(set(int(p) for p in partitions))
            self._consumer.assign([TopicPartition(topic, p) for p in self._fixed])

    # -- helpers ----------------------------------------------------------------
    def _tps(self) -> list[TopicPartition]:
        if self._fixed is not None:
            return [TopicPartition(self.topic, p) for p in self._fixed]
        return sorted(self._consumer.assignment(), key=lambda tp: tp.partition)

    def _apply_pending(self, assigned: Any) -> None:
        tps = [tp for tp in assigned if tp.topic == self.topic]
        if self._pending_beginning and tps:
            self._consumer.seek_to_beginning(*tps)
            self._pending_beginning = False
        for tp in tps:
            if tp.partition in self._pending_seeks:
                self._consumer.seek(tp, self._pending_seeks.pop(tp.partition))

    def _check(self) -> None:
        if self._closed:
            raise TransportError(f"consumer of {self.topic!r} (group {self.group!r}) is closed")

    def _broker_reachable(self) -> bool:
        # kafka-python keeps reconnecting silently; ask its client whether any broker is up.
        client = self._consumer._client
        return any(client.connected(b.node_id) for b in client.cluster.brokers()) or client.connected("bootstrap-0")

    def _wrap(self, what: str, exc: BaseException) -> TransportError:
        return TransportError(f"{what} for {self.topic!r} (group {self.group!r}) on {self._transport.bootstrap} failed: {_describe(exc)}")

    # -- Consumer ---------------------------------------------------------------
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        self._check()
        try:
            batches = self._consumer.poll(timeout_ms=int(max(0.0, timeout_s) * 1000), max_records=max_records)
        except (KafkaError, OSError) as exc:
            raise self._wrap("poll", exc) from exc
        out: list[Record] = []
        for tp in sorted(batches, key=lambda t: t.partition):
            out.extend(Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in batches[tp])
        if out or self._broker_reachable():
            self._unreachable_since = None
            return out
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        elif now - self._unreachable_since > self._transport.settings.unavailable_timeout_s:
            raise TransportError(
                f"no Kafka broker at {self._transport.bootstrap} reachable for "
                f"{now - self._unreachable_since:.0f}s while polling {self.topic!r} (group {self.group!r})"
            )
        return out

    def commit(self, offsets: Mapping[int, int] | None = None) -> None:
        self._check()
        try:
            if offsets is None:
                self._consumer.commit(timeout_ms=self._timeout_ms)
            else:
                self._consumer.commit(
                    {TopicPartition(self.topic, int(p)): OffsetAndMetadata(int(o), "", -1) for p, o in offsets.items()},
                    timeout_ms=self._timeout_ms,
                )
        except (KafkaError, OSError) as exc:
            raise self._wrap("commit", exc) from exc

    def committed(self) -> dict[int, int]:
        self._check()
        parts = self._fixed if self._fixed is not None else list(range(self._n))
        out = {}
        try:
            for p in parts:
                o = self._consumer.committed(TopicPartition(self.topic, p), timeout_ms=self._timeout_ms)
                if o is not None:
                    out[p] = int(o)
        except (KafkaError, OSError) as exc:
            raise self._wrap("committed offsets", exc) from exc
        return out

    def positions(self) -> dict[int, int]:
        self._check()
        try:
            return {tp.partition: int(self._consumer.position(tp, timeout_ms=self._timeout_ms)) for tp in self._tps()}
        except (KafkaError, OSError) as exc:
            raise self._wrap("positions", exc) from exc

    def seek(self, partition: int, offset: int) -> None:
        self._check()
        if offset < 0:
            raise TransportError(f"cannot seek to negative offset {offset}")
        tp = TopicPartition(self.topic, int(partition))
        if tp in self._tps():
            self._consumer.seek(tp, int(offset))
        elif self._fixed is None and 0 <= partition < self._n:
            self._pending_seeks[int(partition)] = int(offset)  # applied when the group assigns it
        else:
            raise TransportError(f"cannot seek partition {partition}: not assigned")

    def seek_to_beginning(self) -> None:
        self._check()
        tps = self._tps()
        if tps:
            self._consumer.seek_to_beginning(*tps)
        if self._fixed is None:
            self._pending_beginning = not tps  # not yet assigned: replay once the group assigns

    def end_offsets(self) -> dict[int, int]:
        self._check()
        tps = self._tps()
        try:
            ends = self._consumer.end_offsets(tps, timeout_ms=self._timeout_ms) if tps else {}
        except (KafkaError, OSError) as exc:
            raise self._wrap("end offsets", exc) from exc
        out = {}
        for tp in tps:
            # Some brokers (tansu 0.6) answer ListOffsets with the last batch's base offset + 1;
            # the high watermark seen in fetches is authoritative when it is larger.
            hw = self._consumer.highwater(tp)
            out[tp.partition] = max(int(ends.get(tp, 0)), int(hw) if hw is not None else 0)
        return out

    def assignment(self) -> list[int]:
        """Partitions currently assigned (empty before a group join completes)."""
        return [tp.partition for tp in self._tps()]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close(autocommit=False, timeout_ms=self._timeout_ms)
        except Exception as exc:  # the broker may be gone; closing must not raise
            log.warning("consumer close failed: %s", _describe(exc))
