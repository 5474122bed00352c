"""Loading a log for a command: one place that turns a bad source into a clear exit."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from streams.datasets import EventLog, load_source


def load_or_exit(source: str, console: Console, **opts: Any) -> EventLog:
    """``load_source`` with a spinner; a source that cannot be read exits 2 with the reason, not a traceback."""
    try:
        with console.status(f"loading {source}"):
            return load_source(source, **opts)
    except ValueError as exc:
        console.print(f"[red]cannot load {source}:[/red] {exc}")
        raise typer.Exit(2) from None
