"""Feature-based collaboration: devices send a compact interest vector; the cloud retrieves with it."""

from __future__ import annotations

from tandem.strategies.base import Strategy


class FeatureStrategy(Strategy):
    """Device rerank plus a 4+d byte interest vector after engagements (subject to the policy).

    The cloud keeps the latest vector per user and retrieves with it as a second recall
    channel (``cloud_recsys.recall``): part of the user's next list reflects what they did
    since the cloud last saw them, while every candidate keeps the main model's score.
    """

    name = "feature"
    families = ("feature",)
    upload_on = "engagement"
    description = "device rerank + interest vector upload (int8) as a second cloud recall channel"
