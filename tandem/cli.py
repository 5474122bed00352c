"""The ``tandem`` command line. Each command lives in its own module under
tandem/commands/ and registers itself here, so commands stay independent."""

from __future__ import annotations

import logging

import typer

from tandem.commands import COMMAND_MODULES

app = typer.Typer(
    name="tandem",
    help="Tandem: a device-cloud collaborative recommender for feeds and livestreaming.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for _module in COMMAND_MODULES:
    _module.register(app)
