"""``tandem serve cloud|fleet|replayer|dashboard``: run one Tandem service.

Every option can also be set with a ``TANDEM_<OPTION>`` environment variable (flags win);
see tandem/services/settings.py and docs/services.md.
"""

from __future__ import annotations

import logging
from typing import Optional

import typer

from tandem.services.settings import CloudSettings, DashboardSettings, FleetSettings, ReplayerSettings, as_dict, from_env

log = logging.getLogger(__name__)

serve_app = typer.Typer(help="Run one Tandem service (env TANDEM_* or flags).", no_args_is_help=True)

_TRANSPORT = typer.Option(None, "--transport", help="kafka://host:port or embedded:/path [TANDEM_TRANSPORT]")
_HOST = typer.Option(None, "--host", help="HTTP bind address [TANDEM_HOST]")
_PORT = typer.Option(None, "--port", help="HTTP port [TANDEM_PORT]")


def _check_strategy(name: str) -> None:
    from tandem.strategies import STRATEGIES

    if name not in STRATEGIES:
        raise typer.BadParameter(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}", param_hint="--strategy")


@serve_app.command("cloud")
def cloud(
    transport: Optional[str] = _TRANSPORT,
    host: Optional[str] = _HOST,
    port: Optional[int] = _PORT,
    engine: Optional[str] = typer.Option(None, "--engine", help="recommender | popular [TANDEM_ENGINE]"),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="collaboration strategy; the fleet must run the same [TANDEM_STRATEGY]"),
    domain: Optional[str] = typer.Option(None, "--domain", help="repeat | feed [TANDEM_DOMAIN]"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="[TANDEM_CHECKPOINT_DIR]"),
    checkpoint_every_s: Optional[float] = typer.Option(None, "--checkpoint-every-s"),
    refresh_every_events: Optional[int] = typer.Option(None, "--refresh-every-events"),
    partitions: Optional[int] = typer.Option(None, "--partitions"),
    source: Optional[str] = typer.Option(None, "--source", help="optional log for warm start [TANDEM_SOURCE]"),
    max_idle_s: Optional[float] = typer.Option(None, "--max-idle-s", help="exit after this long without records"),
) -> None:
    """Cloud: consume interactions/availability/device-updates, train, serve candidates."""
    from tandem.services.cloud_service import serve as serve_cloud

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
        source=source,
    )
    _check_strategy(s.strategy)
    log.info("cloud settings: %s", as_dict(s))
    serve_cloud(s, max_idle_s=max_idle_s)


@serve_app.command("fleet")
def fleet(
    transport: Optional[str] = _TRANSPORT,
    host: Optional[str] = _HOST,
    port: Optional[int] = _PORT,
    cloud_url: Optional[str] = typer.Option(None, "--cloud-url", help="[TANDEM_CLOUD_URL]"),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="collaboration strategy; the cloud must run the same [TANDEM_STRATEGY]"),
    domain: Optional[str] = typer.Option(None, "--domain", help="repeat | feed [TANDEM_DOMAIN]"),
    max_devices: Optional[int] = typer.Option(None, "--max-devices"),
    max_idle_s: Optional[float] = typer.Option(None, "--max-idle-s", help="exit after this long without records"),
) -> None:
    """Device fleet worker: the strategy's devices fetch candidates, rerank and send signed updates."""
    from tandem.services.fleet_service import serve as serve_fleet

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
    serve_fleet(s, max_idle_s=max_idle_s)


@serve_app.command("replayer")
def replayer(
    transport: Optional[str] = _TRANSPORT,
    host: Optional[str] = _HOST,
    port: Optional[int] = _PORT,
    source: Optional[str] = typer.Option(None, "--source", help="synthetic | movielens | twitch | PATH [TANDEM_SOURCE]"),
    events: Optional[int] = typer.Option(None, "--events", help="cap on replayed events [TANDEM_EVENTS]"),
    speed: Optional[float] = typer.Option(None, "--speed", help="time compression; 0 = max [TANDEM_SPEED]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    exit_when_done: Optional[bool] = typer.Option(None, "--exit-when-done/--keep-serving"),
) -> None:
    """Replayer: replay a log into the interactions topic."""
    from tandem.services.replayer_service import serve as serve_replayer

    s = from_env(
        ReplayerSettings,
        transport=transport,
        host=host,
        port=port,
        source=source,
        events=events,
        speed=speed,
        batch_size=batch_size,
        exit_when_done=exit_when_done,
    )
    log.info("replayer settings: %s", as_dict(s))
    serve_replayer(s)


@serve_app.command("dashboard")
def dashboard(
    host: Optional[str] = _HOST,
    port: Optional[int] = _PORT,
    sources: Optional[str] = typer.Option(None, "--sources", help="name=url,... of /metrics.json endpoints [TANDEM_SOURCES]"),
    poll_s: Optional[float] = typer.Option(None, "--poll-s"),
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
