"""Feature-based collaboration: devices send a compact interest vector; the cloud retrieves with it."""

from __future__ import annotations

from tandem.strategies.base import Strategy


class FeatureStrategy(Strategy):
    """Device rerank plus a 4+d byte interest vector after engagements (subject to the policy).

    The cloud keeps the latest vector per user and retrieves with it as a further recall
    channel of ``cloud_recsys.recommender``: its best items join the merged candidates,
    which the ranking stage then scores like any other.
    """

    name = "feature"
    families = ("feature",)
    upload_on = "engagement"
    description = "device rerank + interest vector upload (int8) as a further cloud recall channel"
