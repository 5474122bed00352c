"""Collaboration strategies, selectable by name.

``STRATEGIES`` maps a name to a ``Strategy`` subclass; ``make_strategies("all")``
or ``make_strategies("cloud-only,feature")`` builds instances. Registering a new
strategy (``register``) is all it takes to evaluate it.
"""

from __future__ import annotations

from tandem.strategies.base import Strategy
from tandem.strategies.cloud_only import CloudOnly
from tandem.strategies.data import DataStrategy
from tandem.strategies.device_rerank import DeviceRerank
from tandem.strategies.feature import FeatureStrategy
from tandem.strategies.federated import FederatedStrategy
from tandem.strategies.hybrid import HybridStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (CloudOnly, DeviceRerank, FeatureStrategy, FederatedStrategy, DataStrategy, HybridStrategy)
}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class to the registry (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError("only Strategy subclasses can be registered")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategies(spec: str | list[str] = "all") -> list[Strategy]:
    """Instances for ``"all"`` or a comma-separated list of names (unknown names raise ``KeyError``)."""
    names = list(STRATEGIES) if spec == "all" or spec == ["all"] else ([s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec))
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise KeyError(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    return [STRATEGIES[n]() for n in names if n]


__all__ = ["STRATEGIES", "Strategy", "make_strategies", "register"]
