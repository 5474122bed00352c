"""Data-based collaboration: consented hard examples train the shared reranker in the cloud."""

from __future__ import annotations

from tandem.strategies.base import Strategy


class DataStrategy(Strategy):
    """Devices (with consent) send a few hard examples at each fetch; the cloud fits the
    reranker's prior head on them and ships the new reranker."""

    name = "data"
    families = ("data",)
    upload_on = "fetch"
    description = "device rerank + consented hard examples, centrally fitted into the reranker"
