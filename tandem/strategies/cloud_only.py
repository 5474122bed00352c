"""Cloud-only: the device shows the cached cloud list as is until the next fetch."""

from __future__ import annotations

from tandem.strategies.base import Strategy


class CloudOnly(Strategy):
    """The reference: no on-device model, no uploads (the cloud learns from the stream only)."""

    name = "cloud-only"
    rerank = False
    families = ()
    description = "cached cloud list shown as is between fetches"
