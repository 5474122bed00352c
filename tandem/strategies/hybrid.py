"""Hybrid: feature + parameter updates and on-device personalization together."""

from __future__ import annotations

import dataclasses
from typing import Any

from tandem.strategies.aggregate import AggregatorConfig
from device_rerank.config import DeviceConfig, PersonalizeConfig
from tandem.strategies.base import Strategy
from tandem.strategies.federated import FED_SERVER_LR

#: On-device patch fine-tuning for hybrid devices. The device default (lr 0.05, patch norm
#: up to 5, 5 steps per fetch) overfits the few buffered groups: measured on Twitch (first
#: 12k events) NDCG@10 -4.6% vs cloud-only, against +0.3% with personalization off. A
#: smaller step and a tighter norm bound keep the patch a small correction, and the patch is
#: kept only when it lowers the loss on the newest 4 groups (whole Twitch log: +0.9% -> +1.4%).
HYBRID_PERSONALIZE = PersonalizeConfig(lr=0.01, max_norm=1.0, l2=1e-2, holdout_groups=4)


class HybridStrategy(Strategy):
    """Interest vectors for retrieval, federated reranker deltas, and a per-user patch.

    Feature updates go after engagements (cheap), parameter updates at fetches.

    Args:
        personalize_steps: patch fine-tuning steps at each fetch.
        personalize: the devices' ``PersonalizeConfig`` (default ``HYBRID_PERSONALIZE``).
    """

    name = "hybrid"
    families = ("feature", "parameter")
    upload_on = "engagement"
    description = "feature + federated updates + on-device per-user patch"

    def __init__(
        self,
        *args: Any,
        personalize_steps: int = 5,
        personalize: PersonalizeConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        **kwargs: Any,
    ) -> None:
        agg = aggregator or AggregatorConfig(server_lr=FED_SERVER_LR)
        super().__init__(*args, personalize_steps=personalize_steps, aggregator=agg, **kwargs)
        self.personalize = personalize or HYBRID_PERSONALIZE

    def device_config(self, base: DeviceConfig) -> DeviceConfig:
        return dataclasses.replace(super().device_config(base), personalize=self.personalize)

    def families_for(self, trigger: str) -> tuple[str, ...]:
        """Interest vectors after engagements; parameter deltas (costlier) at fetches."""
        return {"engagement": ("feature",), "fetch": ("parameter",)}.get(trigger, ())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "personalize": dataclasses.asdict(self.personalize)}
