"""User mistakes become one line and exit 2; tracebacks only with ``-v``.

Why: a newcomer who mistypes a source or a strategy should read what to fix, not 30
lines of Python. Every command is wrapped by ``guard`` (tandem/cli.py does it for all
registered commands), so a command only has to raise ``UserError`` (or let a loader's
``ValueError`` through) and the wrapper prints ``error: ...`` on stderr.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Set by the ``-v`` callback in tandem/cli.py: show tracebacks instead of one line.
VERBOSE: list[bool] = [False]

#: Exit status of a user mistake (the same as click's usage errors).
USAGE_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; its message is the whole output."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def fail(message: str) -> NoReturn:
    """Stop the command with a one-line user error."""
    raise UserError(message)


def check_positive(value: float | int | None, flag: str, allow_zero: bool = False) -> None:
    """``--flag`` must be a finite number above 0 (or at least 0 with ``allow_zero``)."""
    if value is None:
        return
    import math

    if isinstance(value, float) and not math.isfinite(value):
        fail(f"{flag} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        fail(f"{flag} must be {'0 or more' if allow_zero else 'positive'}, got {value}")


def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """Fail before any work when ``path`` cannot be created or written (checked by creating it)."""
    try:
        if path.exists() and not path.is_dir():
            fail(f"{flag} {path}: exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tandem-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(f"{flag} {path}: not writable ({exc.strerror or exc})")
    if not os.access(path, os.W_OK):  # pragma: no cover - root ignores permissions
        fail(f"{flag} {path}: not writable")


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, OSError, KeyError, ValueError)):
        return True
    name = type(exc).__name__
    return name in ("NoBrokersAvailable", "KafkaConnectionError", "KafkaTimeoutError", "TransportError")


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif type(exc).__name__ == "NoBrokersAvailable":
        text = "no Kafka broker answers at the given address (is it running? try the embedded transport: --transport embedded:runs/log)"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the exception held


def guard(fn: F) -> F:
    """Run a command; turn a user mistake into ``error: ...`` and exit 2 (traceback only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except typer.BadParameter as exc:  # raised by a command's own checks: one line, not click's usage box
            if VERBOSE[0]:
                traceback.print_exc()
            print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
            raise typer.Exit(USAGE_EXIT) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:
            if VERBOSE[0]:
                traceback.print_exc()
            if _is_user_error(exc):
                print(f"error: {_message(exc)}", file=sys.stderr)
                raise typer.Exit(USAGE_EXIT) from None
            print(f"error: {type(exc).__name__}: {_message(exc)} (run with -v for the traceback)", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def guard_app(app: typer.Typer) -> None:
    """Wrap every command of ``app`` and of its sub-apps with ``guard``."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_tandem_guarded", False):
            info.callback = guard(info.callback)
            info.callback._tandem_guarded = True  # type: ignore[attr-defined]
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_app(group.typer_instance)


def check_broker(url: str, timeout_s: float = 3.0) -> None:
    """For a ``kafka://host:port[,host:port]`` URL, fail in one line unless some broker accepts a TCP connection.

    Why: kafka-python retries a dead bootstrap for a minute, logging every try; a user who forgot
    to start the broker should learn it at once. Other URLs pass unchecked.
    """
    import socket

    if not url.startswith("kafka://"):
        return
    hosts = [h for h in url[len("kafka://") :].split("/")[0].split(",") if h]
    for hostport in hosts:
        host, _, port = hostport.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError):
            continue
    fail(f"no Kafka broker answers at {url} (start one, or use the embedded log: --transport embedded:runs/log)")
