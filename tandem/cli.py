"""The ``tandem`` command line. Each command lives in its own module under
tandem/commands/ and registers itself here, so commands stay independent.

Quiet by default (WARNING); ``-v`` turns on debug logging and tracebacks. Every command
is wrapped so a user mistake prints one ``error:`` line and exits 2 (tandem/commands/_errors.py).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import typer

from tandem.commands import COMMAND_MODULES
from tandem.commands._errors import VERBOSE, guard_app

app = typer.Typer(
    name="tandem",
    help="Tandem: a device-cloud collaborative recommender for feeds and livestreaming.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags without a <bool> type, defaults shown, any width
)

#: Libraries that log at INFO on import or per request; kept at WARNING unless -v.
NOISY_LOGGERS: tuple[str, ...] = ("httpx", "httpcore", "uvicorn", "uvicorn.access", "uvicorn.error", "kafka", "faiss", "torch", "fbgemm_gpu", "matplotlib")


def version() -> str:
    """The installed package version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("tandem")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tandem {version()}")
        raise typer.Exit()


def setup_logging(verbose: bool) -> None:
    """WARNING by default, DEBUG with -v; replaces handlers a library may have installed."""
    level = logging.DEBUG if verbose else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, force=True)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:  # torch warns about its own tracing internals from every forked worker
        for name in ("torch", "torch.fx._symbolic_trace"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # kafka-python logs every reconnect try; Tandem reports an unreachable broker itself, once
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.*")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, and tracebacks on errors."),
    show_version: Optional[bool] = typer.Option(
        None, "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    VERBOSE[0] = verbose
    setup_logging(verbose)


for _module in COMMAND_MODULES:
    _module.register(app)
guard_app(app)


if __name__ == "__main__":  # python -m tandem.cli
    app()
