"""``tandem replay SOURCE``: load a log and replay it into a transport's topics.

Examples::

    tandem replay synthetic --events 1000000 --transport embedded:runs/log
    tandem replay twitch --speed 3600x --transport kafka://127.0.0.1:9092
    tandem replay path/to/ratings.csv --speed max
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer

from tandem.commands._errors import check_broker, check_positive, fail
from tandem.commands._load import (
    COLUMNS_HELP,
    EVENTS_HELP,
    LIMIT_HELP,
    SEP_HELP,
    SPEED_HELP,
    TS_UNIT_HELP,
    check_limit,
    config_option,
    parse_speed,
    source_argument,
    source_options,
)

log = logging.getLogger(__name__)

__all__ = ["parse_speed", "replay_command", "register"]


def replay_command(
    source: str = source_argument(),
    config_file: Optional[Path] = config_option(),
    transport: str = typer.Option("embedded:runs/log", "--transport", "-t", help="embedded:PATH or kafka://host:port"),
    speed: str = typer.Option("max", "--speed", "-s", help=SPEED_HELP),
    events: Optional[int] = typer.Option(None, "--events", "-n", help=EVENTS_HELP + " [default: 100000]"),
    limit: Optional[int] = typer.Option(None, "--limit", help=LIMIT_HELP),
    sep: Optional[str] = typer.Option(None, "--sep", help=SEP_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    ts_unit: Optional[str] = typer.Option(None, "--ts-unit", help=TS_UNIT_HELP),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic log"),
    batch_size: int = typer.Option(512, "--batch-size", help="events per wire record"),
    partitions: int = typer.Option(4, "--partitions", help="partitions of topics created by the replay"),
    topic: str = typer.Option("interactions", "--topic", help="topic for user events"),
    availability_topic: str = typer.Option("availability", "--availability-topic", help="topic for stream live/offline; '' to skip"),
) -> None:
    """Replay a log into the interactions (and availability) topics, then print a summary.

    Examples: tandem replay synthetic --events 1000000;  tandem replay twitch --speed 3600x -t kafka://127.0.0.1:9092
    """
    from rich.console import Console
    from rich.table import Table

    from streams.replay import replay
    from streams.transports import open_transport
    from tandem.commands._load import load_or_exit

    console = Console(stderr=True)
    pace = parse_speed(speed)
    check_positive(batch_size, "--batch-size")
    check_positive(partitions, "--partitions")
    check_limit(limit)
    opts: dict[str, Any] = source_options(source, events, seed, sep, columns, ts_unit, default_events=100_000)
    check_broker(transport)
    try:  # a bad --transport or a broker that is down fails before the log is loaded
        tr = open_transport(transport)
    except (ValueError, OSError) as exc:
        fail(f"bad --transport {transport}: {exc}")
    try:
        event_log = load_or_exit(source, console, **opts)
    except BaseException:
        tr.close()
        raise
    availability_range: tuple[int | None, int | None] | None = None
    if limit is not None and limit < len(event_log):
        # transitions after the cut belong to events that are not replayed
        availability_range = (None, int(event_log.events.ts_ms.iloc[limit]))
        event_log = event_log.rows(0, limit)
    console.print(
        f"{event_log.name}: {len(event_log):,} events, {event_log.n_users:,} users, {event_log.n_items:,} items"
        + (f", {len(event_log.availability):,} live intervals" if event_log.availability is not None else ""),
        highlight=False,
    )
    try:
        summary = replay(
            event_log,
            tr,
            topic=topic,
            availability_topic=availability_topic or None,
            speed=pace,
            batch_size=batch_size,
            progress=True,
            partitions=partitions,
            availability_range=availability_range,
        )
    finally:
        tr.close()
    table = Table(title=f"replay {event_log.name} -> {transport}")
    table.add_column("topic")
    table.add_column("events", justify="right")
    table.add_column("records", justify="right")
    for name, count in summary.per_topic.items():
        table.add_row(name, f"{count:,}", f"{summary.records_per_topic.get(name, 0):,}")
    table.add_row("total", f"{sum(summary.per_topic.values()):,}", f"{summary.records:,}")
    out = Console()
    out.print(table)
    out.print(
        f"{summary.seconds:.2f} s, {summary.events_per_s:,.0f} events/s, {summary.bytes / 1e6:.1f} MB "
        f"({summary.bytes / max(1, sum(summary.per_topic.values())):.1f} B/event)"
    )


def register(app: typer.Typer) -> None:
    """Add ``tandem replay`` to the CLI."""
    app.command("replay")(replay_command)
