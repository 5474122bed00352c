"""Multi-channel recall: merge the ranked lists of several retrieval channels into one candidate set.

Why channels instead of one blended query: a device-side interest vector (feature-based
collaboration) summarizes engagements the cloud model has mostly seen already. Blended
into the user's query it moves the cloud scores the device reranker relies on (measured on
Twitch: -1.6% NDCG@10 against not uploading). As a second recall channel it can only add
candidates: the main channel keeps most slots, and every candidate keeps the main model's
score, so the reranker's view of the cloud is unchanged.
"""

from __future__ import annotations

import numpy as np



def merge_channels(primary: np.ndarray, secondary: np.ndarray, k: int, share: float) -> np.ndarray:
    """The first ``k`` distinct ids: the primary channel's top ``k - m``, then up to ``m`` of the
    secondary channel's best not already taken (``m = round(share * k)``), then the primary's
    next ones if the secondary ran short.

    Args:
        primary: ids (or row indices) ranked best first by the main channel.
        secondary: ids ranked best first by the other channel.
        k: list length.
        share: fraction of the ``k`` slots the secondary channel may fill, in [0, 1].
    Returns:
        int64 ids in channel order (callers order them by their own score).
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    m = int(round(share * k))
    head = [int(i) for i in np.asarray(primary)[: k - m]]
    taken = set(head)
    extra: list[int] = []
    for i in np.asarray(secondary).tolist():
        if len(extra) >= m:
            break
        if i not in taken:
            taken.add(i)
            extra.append(int(i))
    fill: list[int] = []
    room = k - len(head) - len(extra)
    for i in np.asarray(primary)[k - m :].tolist():
        if len(fill) >= room:
            break
        if i not in taken:
            taken.add(i)
            fill.append(int(i))
    return np.asarray(head + extra + fill, dtype=np.int64)
