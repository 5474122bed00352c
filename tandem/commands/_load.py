"""What every command shares: the source argument and its loading options, ``--config``, errors on load.

One vocabulary (issue 15): a positional SOURCE; ``--limit N`` for "the first N events of the
log"; ``--events N`` for the size of the synthetic log only; ``--sep``, ``--columns`` and
``--ts-unit`` to read any table; ``--config run.yaml`` for any flag.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from streams.datasets import SOURCES, EventLog, load_source
from tandem.commands._errors import did_you_mean, fail

logger = logging.getLogger(__name__)

#: Help of the positional SOURCE, the same in every command.
SOURCE_HELP = "synthetic | movielens | twitch | yoochoose | path to a log file or folder"


def source_argument(default: str = "synthetic") -> Any:
    """The positional SOURCE of every command."""
    return typer.Argument(default, help=SOURCE_HELP, show_default=True, metavar="SOURCE")


def hidden_source_option() -> Any:
    """``--source`` kept as a hidden alias of the positional SOURCE (old scripts keep working)."""
    return typer.Option(None, "--source", hidden=True)


SEP_HELP = "field separator of a table (default: sniffed among tab , ; |)"
COLUMNS_HELP = "which columns hold what, e.g. user=SessionId,item=ItemId,ts=Time (default: guessed from the header)"
TS_UNIT_HELP = "time unit of the ts column: s | ms | us | datetime (default: detected, with a warning)"
LIMIT_HELP = "use only the first N events of the log"
EVENTS_HELP = "size of the synthetic log (synthetic source only)"


def source_options(
    source: str,
    events: Optional[int] = None,
    seed: int = 0,
    sep: Optional[str] = None,
    columns: Optional[str] = None,
    ts_unit: Optional[str] = None,
    default_events: int = 60_000,
) -> dict[str, Any]:
    """``load_source`` keyword arguments for the command-line flags (checked first, so a mistake costs nothing)."""
    if events is not None and events <= 0:
        fail(f"--events must be positive, got {events}")
    if source == "synthetic":
        if sep or columns or ts_unit:
            fail("--sep, --columns and --ts-unit apply to a log file, not to the synthetic source")
        return {"events": events or default_events, "seed": seed}
    if events is not None:
        fail("--events sets the size of the synthetic log; use --limit N to use the first N events of a log")
    if ts_unit is not None and ts_unit not in ("s", "ms", "us", "step", "datetime"):
        fail(f"--ts-unit must be s, ms, us or datetime, got {ts_unit!r}{did_you_mean(ts_unit, ['s', 'ms', 'us', 'datetime'])}")
    if sep is not None:
        sep = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(sep, sep)
    opts = {"sep": sep, "columns": columns, "ts_unit": ts_unit}
    opts = {k: v for k, v in opts.items() if v is not None}
    if opts and source in SOURCES:
        fail(f"--sep, --columns and --ts-unit apply to a log file; {source!r} is a named source")
    return opts


def load_or_exit(source: str, console: Console, **opts: Any) -> EventLog:
    """``load_source`` with a spinner; a source that cannot be read exits 2 with the reason, not a traceback."""
    try:
        with console.status(f"loading {source}"):
            return load_source(source, **opts)
    except ValueError as exc:
        typer.echo(f"error: cannot load {source}: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None


SPEED_HELP = "replay pace: max (as fast as possible) or time compression, e.g. 3600x or 60"


def parse_speed(text: str | None) -> float | None:
    """``max`` / ``0`` / empty -> None (as fast as possible); ``3600x`` or ``3600`` -> 3600.0.

    The one ``--speed`` of every command (replay, demo, serve replayer).
    """
    import math

    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("", "max", "0", "0x", "inf", "none"):
        return None
    if t.endswith("x"):
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use max, 3600x or a number", param_hint="--speed") from None
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"{text!r}: speed must be a positive number (or max)", param_hint="--speed")
    return value


def check_limit(limit: Optional[int]) -> None:
    if limit is not None and limit <= 0:
        fail(f"--limit must be positive, got {limit}")


# -- --config run.yaml ------------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of flag names to values; keys may be written ``n-boot``, ``--n-boot`` or ``n_boot``."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}


def config_callback(ctx: typer.Context, param: Any, value: Optional[Path]) -> Optional[Path]:
    """Eager ``--config``: the file's values become the defaults of this command's flags (flags still win)."""
    if value is None:
        return value
    try:
        data = read_config(value)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    known = [p.name for p in ctx.command.params if p.name and p.name != "config"]
    for key in data:
        if key not in known:
            typer.echo(f"error: --config {value}: unknown setting {key!r}{did_you_mean(key, known)}; known: {', '.join(sorted(known))}", err=True)
            raise typer.Exit(2)
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def config_option() -> Any:
    """``--config run.yaml``: every flag of the command, from a file."""
    return typer.Option(
        None, "--config", help="YAML file of this command's flags (e.g. n_boot: 200); flags on the command line win",
        is_eager=True, callback=config_callback, exists=False, dir_okay=False,
    )
