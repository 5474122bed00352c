"""The replayer service: loads a log and replays it into ``interactions`` and ``availability``.

Replays in chunks through ``streams.replay.replay`` so ``/metrics`` shows progress
(``events_replayed``) while it runs. Availability transitions are built once from the
whole log and each chunk sends only those in its own time range ``[ts[start], ts[stop])``:
every transition goes out exactly once, with an event id that collides with no user
event. (``replay(slice, availability_range=...)`` would number a slice's transitions
from the *slice's* largest event id, so they would collide with later user events and
the cloud's id dedup would drop those events.)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import numpy as np

from streams.transport import Transport
from tandem.services.metrics import Registry, add_metrics_routes
from tandem.services.settings import TOPIC_AVAILABILITY, TOPIC_INTERACTIONS, ReplayerSettings, dlq_topic

log = logging.getLogger(__name__)


def load_log(source: str, events: int = 0, seed: int = 0) -> Any:
    """The event log to replay (``streams.datasets.load_source``), capped at ``events`` rows."""
    from streams.datasets import load_source

    opts: dict[str, Any] = {}
    if source == "synthetic":
        opts = {"events": events or 20_000, "seed": seed}
    log_ = load_source(source, **opts)
    return log_.rows(0, events) if events and len(log_) > events else log_


class Replayer:
    """Replays an EventLog into a transport, chunk by chunk.

    Args:
        settings: source, pacing and batching.
        transport: destination.
        registry: metrics (``events_replayed``, ``replay_done``).
        chunk: events per ``replay`` call (progress granularity).
    """

    def __init__(self, settings: ReplayerSettings, transport: Transport, registry: Registry | None = None, chunk: int = 500) -> None:
        self.settings = settings
        self.transport = transport
        self.metrics = registry or Registry("replayer")
        self.chunk = chunk
        self._stop = threading.Event()
        self.done = threading.Event()
        self.replayed = 0
        self.availability_sent = 0

    def ensure_topics(self) -> None:
        for topic in (TOPIC_INTERACTIONS, TOPIC_AVAILABILITY):
            self.transport.create_topic(topic, self.settings.partitions)
            self.transport.create_topic(dlq_topic(topic), 1)

    def run(self, event_log: Any | None = None) -> int:
        """Replay the whole log (or until ``stop()``); returns events sent."""
        from streams.producer import BatchingProducer
        from streams.replay import availability_batch, replay

        s = self.settings
        self.ensure_topics()
        event_log = event_log if event_log is not None else load_log(s.source, s.events, s.seed)
        total = len(event_log)
        self.metrics.set("events_total", total, help="events in the log being replayed")
        log.info("replaying %d events from %s", total, event_log.name)
        t0 = time.monotonic()
        # Availability transitions of the whole log, built once so their event ids are unique
        # (ids continue after the log's largest id), then sent chunk by chunk ahead of the
        # chunk's user events, so streams are live before anyone enters them.
        avail = availability_batch(event_log)
        av_ts = avail.ts_ms
        av_producer = BatchingProducer(self.transport, TOPIC_AVAILABILITY, s.batch_size) if len(avail) else None
        ts = event_log.events.ts_ms.to_numpy()
        wall0 = time.monotonic()
        for start in range(0, total, self.chunk):
            if self._stop.is_set():
                break
            stop = min(total, start + self.chunk)
            if s.speed and start:
                # replay() paces within a call; keep the log-time gap between chunks too
                wait = wall0 + (int(ts[start]) - int(ts[0])) / 1000.0 / s.speed - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
            part = event_log.rows(start, stop)
            if av_producer is not None:
                # transitions with ts[start] <= ts < ts[stop] (unbounded at the ends); av_ts is sorted
                lo = 0 if start == 0 else int(np.searchsorted(av_ts, ts[start], side="left"))
                hi = len(av_ts) if stop >= total else int(np.searchsorted(av_ts, ts[stop], side="left"))
                sel = np.arange(lo, hi)
                if len(sel):
                    av_producer.send(avail.take(sel))
                    av_producer.flush()
                    self.availability_sent += len(sel)
                    self.metrics.set("availability_replayed", self.availability_sent)
            replay(
                part,
                self.transport,
                topic=TOPIC_INTERACTIONS,
                availability_topic=None,
                speed=s.speed or None,
                batch_size=s.batch_size,
                progress=False,
                partitions=s.partitions,
            )
            self.replayed += len(part)
            self.metrics.set("events_replayed", self.replayed, help="events sent to interactions")
        self.transport.flush()
        elapsed = time.monotonic() - t0
        self.metrics.set("replay_seconds", elapsed)
        self.metrics.set("replay_done", 1.0)
        self.done.set()
        log.info("replayed %d events in %.1fs (%.0f events/s)", self.replayed, elapsed, self.replayed / max(elapsed, 1e-9))
        return self.replayed

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "events_replayed": self.replayed, "done": self.done.is_set()}


def serve(settings: ReplayerSettings) -> None:
    """Run the replayer with its /healthz + /metrics API until done (or forever when serving)."""
    from fastapi import FastAPI

    from tandem.services.runtime import HttpServer, open_transport, wait_for_termination

    transport = open_transport(settings.transport)
    replayer = Replayer(settings, transport)
    app = add_metrics_routes(FastAPI(title="tandem replayer"), replayer.metrics, health=replayer.health)
    server = HttpServer(app, settings.host, settings.port).start()
    signal.signal(signal.SIGTERM, lambda *_: replayer.stop())
    try:
        replayer.run()
        if not settings.exit_when_done and not replayer.stopped:
            wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        transport.close()
