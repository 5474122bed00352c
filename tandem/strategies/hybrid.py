"""Hybrid: feature + parameter updates and on-device personalization together."""

from __future__ import annotations

from typing import Any

from cloud_recsys.aggregate import AggregatorConfig
from tandem.strategies.base import Strategy
from tandem.strategies.federated import FED_SERVER_LR


class HybridStrategy(Strategy):
    """Interest vectors for retrieval, federated reranker deltas, and a per-user patch.

    Feature updates go after engagements (cheap), parameter updates at fetches.
    """

    name = "hybrid"
    families = ("feature", "parameter")
    upload_on = "engagement"
    description = "feature + federated updates + on-device per-user patch"

    def __init__(self, *args: Any, personalize_steps: int = 5, aggregator: AggregatorConfig | None = None, **kwargs: Any) -> None:
        agg = aggregator or AggregatorConfig(server_lr=FED_SERVER_LR)
        super().__init__(*args, personalize_steps=personalize_steps, aggregator=agg, **kwargs)

    def families_for(self, trigger: str) -> tuple[str, ...]:
        """Interest vectors after engagements; parameter deltas (costlier) at fetches."""
        return {"engagement": ("feature",), "fetch": ("parameter",)}.get(trigger, ())
