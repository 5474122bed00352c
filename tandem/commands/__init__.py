"""Command modules; each exposes ``register(app: typer.Typer) -> None``.

Discovered by name so that adding a command touches no shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

COMMAND_MODULES: list[ModuleType] = [
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
    if not info.name.startswith("_")
]
