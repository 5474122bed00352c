"""``tandem serve cloud|fleet|replayer|dashboard``: run one Tandem service.

Every option can also be set with a TANDEM_<OPTION> environment variable (flags win);
see tandem/services/settings.py and docs/services.md. Help shows each setting's default.
"""

from __future__ import annotations

import logging
from typing import Optional

import typer

from tandem.commands._errors import check_broker, check_positive, did_you_mean, fail
from tandem.commands._load import LIMIT_HELP, SOURCE_HELP, SPEED_HELP, parse_speed
from tandem.services.settings import CloudSettings, DashboardSettings, FleetSettings, ReplayerSettings, as_dict, from_env

log = logging.getLogger(__name__)

serve_app = typer.Typer(help="Run one Tandem service (env TANDEM_* or flags).", no_args_is_help=True, rich_markup_mode=None)



def _default(cls: type, name: str) -> str:
    """`` [default: X; env TANDEM_NAME]`` from the settings dataclass, so help shows what a flag left out means."""
    value = cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]
    shown = "''" if value == "" else value
    return f" [default: {shown}; env TANDEM_{name.upper()}]"


def _transport(cls: type) -> object:
    return typer.Option(None, "--transport", help="kafka://host:port or embedded:/path" + _default(cls, "transport"))


def _host(cls: type) -> object:
    return typer.Option(None, "--host", help="HTTP bind address" + _default(cls, "host"))


def _port(cls: type) -> object:
    return typer.Option(None, "--port", help="HTTP port" + _default(cls, "port"))


def _check_strategy(name: str) -> None:
    from tandem.strategies import STRATEGIES

    if name not in STRATEGIES:
        fail(f"--strategy: unknown strategy {name!r}{did_you_mean(name, STRATEGIES)}; choose one of {', '.join(STRATEGIES)}")


@serve_app.command("cloud")
def cloud(
    source: Optional[str] = typer.Argument(None, help="optional: the replayed log, whose item catalogue the cloud knows from the start: " + SOURCE_HELP, metavar="SOURCE"),
    source_opt: Optional[str] = typer.Option(None, "--source", hidden=True),
    events: Optional[int] = typer.Option(None, "--events", help="the replayer's --events (a synthetic world's catalogue depends on it)" + _default(CloudSettings, "events")),
    transport: Optional[str] = _transport(CloudSettings),
    host: Optional[str] = _host(CloudSettings),
    port: Optional[int] = _port(CloudSettings),
    engine: Optional[str] = typer.Option(None, "--engine", help="recommender | popular" + _default(CloudSettings, "engine")),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="collaboration strategy; the fleet must run the same" + _default(CloudSettings, "strategy")),
    domain: Optional[str] = typer.Option(None, "--domain", help="repeat | feed" + _default(CloudSettings, "domain")),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="where model and offsets are saved ('' = none)" + _default(CloudSettings, "checkpoint_dir")),
    checkpoint_every_s: Optional[float] = typer.Option(None, "--checkpoint-every-s", help="seconds between checkpoints" + _default(CloudSettings, "checkpoint_every_s")),
    refresh_every_events: Optional[int] = typer.Option(None, "--refresh-every-events", help="events between index refreshes" + _default(CloudSettings, "refresh_every_events")),
    partitions: Optional[int] = typer.Option(None, "--partitions", help="partitions of the topics it creates" + _default(CloudSettings, "partitions")),
    max_idle_s: Optional[float] = typer.Option(None, "--max-idle-s", help="exit after this long without records [default: never]"),
) -> None:
    """Cloud: consume interactions, availability and device updates; train; serve candidates over HTTP."""
    from tandem.services.cloud_service import serve as serve_cloud

    for value, flag in ((checkpoint_every_s, "--checkpoint-every-s"), (refresh_every_events, "--refresh-every-events"), (partitions, "--partitions"), (max_idle_s, "--max-idle-s")):
        check_positive(value, flag)
    s = from_env(
        CloudSettings,
        transport=transport,
        host=host,
        port=port,
        engine=engine,
        strategy=strategy,
        domain=domain,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_s=checkpoint_every_s,
        refresh_every_events=refresh_every_events,
        partitions=partitions,
        source=source_opt or source,
        events=events,
    )
    _check_strategy(s.strategy)
    log.info("cloud settings: %s", as_dict(s))
    check_broker(s.transport)
    serve_cloud(s, max_idle_s=max_idle_s)


@serve_app.command("fleet")
def fleet(
    transport: Optional[str] = _transport(FleetSettings),
    host: Optional[str] = _host(FleetSettings),
    port: Optional[int] = _port(FleetSettings),
    cloud_url: Optional[str] = typer.Option(None, "--cloud-url", help="the cloud's candidates API" + _default(FleetSettings, "cloud_url")),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="collaboration strategy; the cloud must run the same" + _default(FleetSettings, "strategy")),
    domain: Optional[str] = typer.Option(None, "--domain", help="repeat | feed" + _default(FleetSettings, "domain")),
    max_devices: Optional[int] = typer.Option(None, "--max-devices", help="devices simulated at most" + _default(FleetSettings, "max_devices")),
    max_idle_s: Optional[float] = typer.Option(None, "--max-idle-s", help="exit after this long without records [default: never]"),
) -> None:
    """Device fleet worker: the strategy's devices fetch candidates, rerank and send signed updates."""
    from tandem.services.fleet_service import serve as serve_fleet

    for value, flag in ((max_devices, "--max-devices"), (max_idle_s, "--max-idle-s")):
        check_positive(value, flag)
    s = from_env(
        FleetSettings,
        transport=transport,
        host=host,
        port=port,
        cloud_url=cloud_url,
        strategy=strategy,
        domain=domain,
        max_devices=max_devices,
    )
    _check_strategy(s.strategy)
    log.info("fleet settings: %s", as_dict(s))
    check_broker(s.transport)
    serve_fleet(s, max_idle_s=max_idle_s)


@serve_app.command("replayer")
def replayer(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + _default(ReplayerSettings, "source"), metavar="SOURCE"),
    source_opt: Optional[str] = typer.Option(None, "--source", hidden=True),
    transport: Optional[str] = _transport(ReplayerSettings),
    host: Optional[str] = _host(ReplayerSettings),
    port: Optional[int] = _port(ReplayerSettings),
    limit: Optional[int] = typer.Option(None, "--limit", help=LIMIT_HELP + " (synthetic: its size; 0: all)" + _default(ReplayerSettings, "events")),
    events: Optional[int] = typer.Option(None, "--events", hidden=True),
    speed: Optional[str] = typer.Option(None, "--speed", help=SPEED_HELP + " [default: max; env TANDEM_SPEED]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="events per wire record" + _default(ReplayerSettings, "batch_size")),
    exit_when_done: Optional[bool] = typer.Option(None, "--exit-when-done/--keep-serving", help="stop after one replay [default: keep serving]"),
) -> None:
    """Replayer: replay a log into the interactions topic."""
    from tandem.services.replayer_service import serve as serve_replayer

    limit = limit if limit is not None else events
    check_positive(limit, "--limit", allow_zero=True)
    check_positive(batch_size, "--batch-size")
    pace = None if speed is None else (parse_speed(speed) or 0.0)
    s = from_env(
        ReplayerSettings,
        transport=transport,
        host=host,
        port=port,
        source=source_opt or source,
        events=limit,
        speed=pace,
        batch_size=batch_size,
        exit_when_done=exit_when_done,
    )
    log.info("replayer settings: %s", as_dict(s))
    check_broker(s.transport)
    serve_replayer(s)


@serve_app.command("dashboard")
def dashboard(
    host: Optional[str] = _host(DashboardSettings),
    port: Optional[int] = _port(DashboardSettings),
    sources: Optional[str] = typer.Option(None, "--sources", help="name=url,... of the services' /metrics.json endpoints" + _default(DashboardSettings, "sources")),
    poll_s: Optional[float] = typer.Option(None, "--poll-s", help="seconds between polls" + _default(DashboardSettings, "poll_s")),
) -> None:
    """Dashboard: scrape the services' metrics and serve the live page."""
    from tandem.dashboard.app import Collector, create_app, parse_sources
    from tandem.services.runtime import HttpServer, wait_for_termination

    s = from_env(
        DashboardSettings,
        host=host,
        port=port,
        sources=tuple(x for x in sources.split(",") if x) if sources else None,
        poll_s=poll_s,
    )
    collector = Collector(remote=parse_sources(s.sources), poll_s=s.poll_s).start()
    server = HttpServer(create_app(collector), s.host, s.port).start()
    typer.echo(f"dashboard on {server.url}")
    try:
        wait_for_termination()
    finally:
        server.stop()
        collector.stop()


def register(app: typer.Typer) -> None:
    """Add ``tandem serve`` to the CLI."""
    app.add_typer(serve_app, name="serve")
