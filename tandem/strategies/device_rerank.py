"""Device-rerank: the device reranks the cached list with fresh context, sends nothing."""

from __future__ import annotations

from tandem.strategies.base import Strategy


class DeviceRerank(Strategy):
    """EdgeRec-style on-device reranking with the shared prior model; no collaboration traffic up."""

    name = "device-rerank"
    rerank = True
    families = ()
    description = "on-device rerank of the cached list (recent actions, live now, repeats); no uploads"
