"""The cloud the prequential loop drives: ``cloud_recsys.recommender.CloudRecommender``, sized for a log.

The same model ``tandem serve cloud`` serves; the evaluation only sizes its tables for
the log (capacity only: ids are still assigned online, in stream order, so nothing
about the future leaks into the model) and hands it the availability the log carries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from cloud_recsys.recommender import CloudRecommender, RecommenderConfig, build_recommender
from streams.datasets.base import EventLog

if TYPE_CHECKING:
    from tandem.evaluation.protocol import EvalConfig


def recommender_for(
    log: EventLog,
    config: "EvalConfig",
    exclude_consumed: bool,
    allowed_at: Callable[[int], np.ndarray | None] | None,
    recommender: RecommenderConfig | None = None,
) -> CloudRecommender:
    """A ``CloudRecommender`` whose tables hold every user/item/category of ``log``.

    Args:
        log: the replayed log (sizes and the item -> category side feature only).
        config: the loop's config (``cloud_dim`` = tower width = the reranker's ``emb_dim``).
        exclude_consumed: feeds without repeats.
        allowed_at: items live at a time (livestreams), or None.
        recommender: channel sizes (defaults otherwise).
    """
    ev = log.events
    cats = log.item_categories()
    return build_recommender(
        int(ev.user_id.nunique()) + 1,
        int(ev.item_id.nunique()) + 1,
        config.cloud_dim,
        num_categories=len(set(cats.values())) + 2,
        session_gap_ms=config.session_gap_ms,
        seed=config.seed,
        exclude_consumed=exclude_consumed,
        item_categories=cats,
        allowed_at=allowed_at,
        base=recommender,
    )


__all__ = ["recommender_for"]
