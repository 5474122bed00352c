"""The collaboration-strategy interface (modelled on Flower's ``Strategy``).

A strategy answers two questions and nothing else:

* what each device runs and sends: rerank on/off, which update families, when it
  uploads (``upload_on`` + an ``UploadPolicy``), on-device personalization steps;
* what the cloud does with a round of verified updates: ``aggregate``.

The evaluation loop (tandem/evaluation/prequential.py) and the services only talk
to this interface, so a new strategy is a new subclass registered in
``tandem.strategies.STRATEGIES``; no loop code changes.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Callable, ClassVar

from tandem.strategies.aggregate import AggregationTarget, Aggregator, AggregatorConfig
from device_rerank.config import DataEncoderConfig, DeviceConfig
from device_rerank.envelope import DecodedUpdate
from device_rerank.policy import AlwaysUpload, UploadPolicy

logger = logging.getLogger(__name__)


class Strategy(abc.ABC):
    """One device-cloud collaboration strategy.

    Args:
        policy_factory: builds the fleet's upload policy (default ``AlwaysUpload``); a
            factory, not an instance, because policies keep per-device state and every
            run needs a fresh one.
        aggregator: how parameter updates are combined (FedAvg by default).
        personalize_steps: on-device patch fine-tuning steps at each fetch (0 = off).
        label: display name (defaults to ``name``); sweeps use it to tell variants apart.
    """

    name: ClassVar[str] = "strategy"
    #: The device reranks the cached list with on-device context (False: show it as is).
    rerank: ClassVar[bool] = True
    #: Update families devices send ("feature", "parameter", "data").
    families: ClassVar[tuple[str, ...]] = ()
    #: When a device considers uploading: after each "engagement" or at each "fetch".
    upload_on: ClassVar[str] = "fetch"
    #: One-line description for reports.
    description: ClassVar[str] = ""

    def __init__(
        self,
        policy_factory: Callable[[], UploadPolicy] | None = None,
        aggregator: AggregatorConfig | None = None,
        personalize_steps: int = 0,
        label: str | None = None,
    ) -> None:
        self.policy_factory = policy_factory or AlwaysUpload
        self.aggregator_config = aggregator or AggregatorConfig()
        self.aggregator = Aggregator(self.aggregator_config)
        self.personalize_steps = int(personalize_steps)
        self.label = label or self.name
        self.policy: UploadPolicy = self.policy_factory()

    # -- device side --------------------------------------------------------
    def device_config(self, base: DeviceConfig) -> DeviceConfig:
        """The runtime config every device of this strategy gets (e.g. data consent)."""
        if "data" in self.families:
            return dataclasses.replace(base, data=dataclasses.replace(base.data or DataEncoderConfig(), consent=True))
        return base

    def configure_device(self, device: Any) -> None:
        """Hook run once per new device (after construction); default does nothing."""

    def reset(self) -> None:
        """Fresh per-run state (policy memory, applied-update ids)."""
        self.policy = self.policy_factory()
        self.aggregator = Aggregator(self.aggregator_config)

    # -- cloud side ---------------------------------------------------------
    def aggregate(self, round: int, updates: list[DecodedUpdate], cloud: AggregationTarget) -> dict:
        """Apply one round of verified updates to this strategy's cloud state; returns a summary."""
        if not updates and not self.aggregator.pending:
            return {"round": round, "received": 0, "applied": 0}
        return self.aggregator.aggregate_round(round, updates, cloud).as_dict()

    def families_for(self, trigger: str) -> tuple[str, ...]:
        """Families a device considers sending at ``trigger`` ("engagement" or "fetch")."""
        return self.families if trigger == self.upload_on else ()

    @property
    def uploads(self) -> bool:
        return bool(self.families)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "rerank": self.rerank,
            "families": list(self.families),
            "upload_on": self.upload_on,
            "policy": type(self.policy).__name__,
            "aggregation": self.aggregator_config.rule,
            "personalize_steps": self.personalize_steps,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(label={self.label!r})"
