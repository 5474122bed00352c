"""Service settings: frozen dataclasses filled from ``TANDEM_*`` environment variables.

Services bind 127.0.0.1 unless told otherwise (``TANDEM_HOST=0.0.0.0`` in containers), and
no secret has a default: ``TANDEM_DEVICE_KEY`` must be set (or ``TANDEM_DEV_MODE=1``).

Every field ``foo`` of a settings class can be set with ``TANDEM_FOO`` (flags passed to
``tandem serve`` override the environment). Dataclasses, not pydantic-settings, so the
services need no extra dependency.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, TypeVar

from streams.delivery import DLQ_SUFFIX

ENV_PREFIX = "TANDEM_"

#: Topic names (docs/architecture.md).
TOPIC_INTERACTIONS = "interactions"
TOPIC_AVAILABILITY = "availability"
TOPIC_UPDATES = "device-updates"
TOPIC_REFRESH = "model-refresh"
ALL_TOPICS: tuple[str, ...] = (TOPIC_INTERACTIONS, TOPIC_AVAILABILITY, TOPIC_UPDATES, TOPIC_REFRESH)


def dlq_topic(topic: str) -> str:
    """The dead-letter topic of ``topic`` (the same suffix ``streams.delivery.DeadLetter`` uses)."""
    return topic + DLQ_SUFFIX


S = TypeVar("S")


def _cast(raw: str, tp: Any) -> Any:
    """Parse an env string into the annotated field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.strip().lower() in ("", "none", "null"):
            return None
        return _cast(raw, args[0])
    if tp is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if origin is tuple:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return raw


def from_env(cls: type[S], env: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Build settings ``cls`` from ``TANDEM_<FIELD>`` env vars, then ``overrides`` (None = unset).

    Args:
        cls: a dataclass type.
        env: the environment to read (default ``os.environ``).
        overrides: explicit values (CLI flags); a None value leaves the env/default in place.
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = _cast(env[key], hints[f.name])
        if overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
    return cls(**values)


def env_names(cls: type) -> list[str]:
    """The env variable names a settings class reads (used by the compose test and docs)."""
    return [ENV_PREFIX + f.name.upper() for f in fields(cls)]


@dataclass(frozen=True)
class CloudSettings:
    """The cloud service: consume, train, aggregate, refresh, serve candidates.

    Args:
        transport: ``kafka://host:port`` or ``embedded:/path`` (see streams.transports).
        host / port: where the candidate + metrics HTTP API listens.
        engine: "recommender" (cloud_recsys' CloudRecommender, the evaluation's cloud) or
            "popular" (cheap baseline for load tests).
        strategy: the collaboration strategy whose aggregation rule device updates go
            through (``tandem.strategies``; the fleet must run the same one).
        domain: "repeat" (livestreams, sessions) or "feed" (consumed items never returned).
        trust_radius: the shipped reranker stays within this L2 distance of the initial one.
        trial_min_devices / trial_max_rounds: the ship gate (as the evaluation's): a changed
            reranker ships only when this many devices scored it no worse, within that many
            refreshes (0: ship at once).
        max_staleness_versions: updates stamped with a model this many refreshes old are still
            accepted (as in the evaluation).
        group: consumer group of the cloud's topic readers.
        partitions: partitions created for ``interactions`` when the service creates topics.
        checkpoint_dir: model + offsets + dedup state; empty disables checkpoints.
        checkpoint_every_s / checkpoint_every_events: checkpoint schedule (whichever first).
        refresh_every_events: publish a model refresh after this many applied user actions.
        refresh_when_idle: also aggregate and refresh whenever the topics run dry (a paused
            stream is served fresh); off, refreshes follow ``refresh_every_events`` alone, as
            in the evaluation's schedule.
        poll_records: records per poll (the bounded in-flight unit: back-pressure).
        max_pending_updates: device updates buffered before consumption of updates pauses.
        aggregate_batch / aggregate_every_s: aggregate buffered updates when this many are
            pending or the oldest has waited this long (or at a refresh / when idle).
        device_key: master secret of device update envelopes (hex or text, >= 16 bytes); the
            service refuses to start without it unless ``dev_mode`` (docs/services.md).
        device_key_previous: earlier masters still accepted during a key rotation (comma-separated).
        dev_mode: run with a published insecure key when ``device_key`` is empty (local demos only).
        num_users / num_items / embedding_dim: model capacity (online id maps grow up to these).
        k: candidates per request when the client gives none.
        source / events: the log being replayed, whose item catalogue (categories) the cloud
            knows from the start (``events`` as the replayer's: a synthetic world's catalogue
            depends on its size). Empty: no catalogue.
    """

    transport: str = "kafka://127.0.0.1:9092"
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "recommender"
    strategy: str = "feature"
    domain: str = "repeat"
    trust_radius: float = 0.5
    trial_min_devices: int = 16  # tandem.strategies.server.TRIAL_MIN_DEVICES (kept light: no torch import here)
    trial_max_rounds: int = 3  # TRIAL_MAX_ROUNDS
    max_staleness_versions: int = 8
    seed: int = 0
    group: str = "cloud"
    partitions: int = 4
    checkpoint_dir: str = ""
    checkpoint_every_s: float = 30.0
    checkpoint_every_events: int = 50_000
    refresh_every_events: int = 5_000
    refresh_when_idle: bool = True
    poll_records: int = 200
    max_pending_updates: int = 1_000
    aggregate_batch: int = 256
    aggregate_every_s: float = 1.0
    device_key: str = ""
    device_key_previous: str = ""
    dev_mode: bool = False
    num_users: int = 100_000
    num_items: int = 50_000
    embedding_dim: int = 32
    k: int = 100
    eval_sample: int = 64
    source: str = ""
    events: int = 0


@dataclass(frozen=True)
class FleetSettings:
    """A device-fleet worker: simulated devices fed by ``interactions``, one per user.

    Replicas share the consumer group ``group``, so the broker splits the users
    (partitions) between them: scale with ``docker compose up --scale fleet=N``.

    Args:
        cloud_url: base URL of the cloud candidate API.
        strategy: what devices run and send (``tandem.strategies``; the cloud must run the
            same one): rerank, update families, upload policy, personalization.
        domain: "repeat" or "feed" (devices drop consumed items).
        session_gap_ms / fetch_every_ms / refetch_every: the fetch schedule
            (``tandem.strategies.schedule``), as in the evaluation.
        min_new_engagements: parameter/data uploads and personalization need this many new
            engagements since the device's last one.
        session_len: recent items a device sends with each fetch.
        embedding_dim: the reranker's width (the cloud's ``embedding_dim``).
        max_devices: devices kept in memory (the oldest are dropped).
        k: candidates fetched per device refresh.
        device_key / dev_mode: as ``CloudSettings`` (devices sign with keys derived from it).
    """

    transport: str = "kafka://127.0.0.1:9092"
    cloud_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8001
    group: str = "fleet"
    device_key: str = ""
    dev_mode: bool = False
    strategy: str = "feature"
    domain: str = "repeat"
    session_gap_ms: int = 30 * 60_000
    fetch_every_ms: int = 30 * 60_000
    refetch_every: int = 1
    min_new_engagements: int = 3
    session_len: int = 32
    embedding_dim: int = 32
    max_devices: int = 5_000
    k: int = 100
    poll_records: int = 200
    http_timeout_s: float = 5.0


@dataclass(frozen=True)
class ReplayerSettings:
    """Replays a log into ``interactions`` (and ``availability``).

    Args:
        source: ``synthetic``, ``movielens``, ``twitch`` or a path (streams.datasets.load_source).
        events: cap on replayed events (0: the whole log).
        speed: time compression (None/0: as fast as possible).
        batch_size: events per wire record.
        exit_when_done: stop after one replay (otherwise keep serving /metrics).
    """

    transport: str = "kafka://127.0.0.1:9092"
    host: str = "127.0.0.1"
    port: int = 8002
    source: str = "synthetic"
    events: int = 20_000
    speed: float = 0.0
    batch_size: int = 512
    partitions: int = 4
    exit_when_done: bool = False
    seed: int = 0


@dataclass(frozen=True)
class DashboardSettings:
    """The live dashboard: polls the services' ``/metrics.json`` and draws charts.

    Args:
        sources: metric endpoints, ``name=url`` pairs separated by commas.
        poll_s: how often the dashboard scrapes its sources.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    sources: tuple[str, ...] = field(default_factory=tuple)
    poll_s: float = 1.0


SETTINGS_BY_SERVICE: dict[str, type] = {
    "cloud": CloudSettings,
    "fleet": FleetSettings,
    "replayer": ReplayerSettings,
    "dashboard": DashboardSettings,
}


def as_dict(settings: Any) -> dict[str, Any]:
    """Plain dict of a settings object (secrets masked) for logs and /healthz."""
    out = dataclasses.asdict(settings)
    for secret in ("device_key", "device_key_previous"):
        if out.get(secret):
            out[secret] = "***"
    return out
