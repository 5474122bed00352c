"""``tandem replay SOURCE``: load a log and replay it into a transport's topics.

Examples::

    tandem replay synthetic --events 1000000 --transport embedded:runs/log
    tandem replay twitch --speed 3600x --transport kafka://127.0.0.1:9092
    tandem replay path/to/ratings.csv --speed max
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import typer

log = logging.getLogger(__name__)


def parse_speed(text: str | None) -> float | None:
    """``max`` / ``0`` / empty -> None (as fast as possible); ``3600x`` or ``3600`` -> 3600.0."""
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("", "max", "0", "inf", "none"):
        return None
    if t.endswith("x"):
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use max, 3600x or a number") from None
    if value <= 0:
        raise typer.BadParameter(f"{text!r}: speed must be positive (or max)")
    return value


def replay_command(
    source: str = typer.Argument(..., help="synthetic | movielens | twitch | path to a file or folder"),
    transport: str = typer.Option("embedded:runs/log", "--transport", "-t", help="embedded:PATH or kafka://host:port"),
    speed: str = typer.Option("max", "--speed", "-s", help="max, or time compression: 3600x, 60"),
    events: Optional[int] = typer.Option(None, "--events", "-n", help="synthetic: events to generate (default 100k)"),
    seed: int = typer.Option(0, "--seed", help="synthetic: random seed"),
    batch_size: int = typer.Option(512, "--batch-size", help="events per wire record"),
    partitions: int = typer.Option(4, "--partitions", help="partitions of topics created by the replay"),
    topic: str = typer.Option("interactions", "--topic", help="topic for user events"),
    availability_topic: str = typer.Option("availability", "--availability-topic", help="topic for stream live/offline; '' to skip"),
    limit: Optional[int] = typer.Option(None, "--limit", help="replay only the first N events of the log"),
) -> None:
    """Replay a log into the interactions (and availability) topics, then print a summary."""
    from rich.console import Console
    from rich.table import Table

    from streams.replay import replay
    from streams.transports import open_transport
    from tandem.commands._load import load_or_exit

    console = Console(stderr=True)
    pace = parse_speed(speed)
    opts: dict[str, Any] = {}
    if source == "synthetic":
        opts = {"events": events or 100_000, "seed": seed}
    elif events is not None:
        raise typer.BadParameter("--events only applies to the synthetic source (use --limit to cut a log)")
    event_log = load_or_exit(source, console, **opts)
    availability_range: tuple[int | None, int | None] | None = None
    if limit is not None and limit < len(event_log):
        # transitions after the cut belong to events that are not replayed
        availability_range = (None, int(event_log.events.ts_ms.iloc[limit]))
        event_log = event_log.rows(0, limit)
    console.print(
        f"{event_log.name}: {len(event_log):,} events, {event_log.n_users:,} users, {event_log.n_items:,} items"
        + (f", {len(event_log.availability):,} live intervals" if event_log.availability is not None else "")
    )
    try:
        tr = open_transport(transport)
    except ValueError as exc:
        console.print(f"[red]bad --transport:[/red] {exc}")
        raise typer.Exit(2) from None
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
