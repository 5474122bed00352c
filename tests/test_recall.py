"""Multi-channel recall: the merge rule and its use for uploaded interest vectors."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_recsys.recall import merge_channels


def test_share_zero_is_the_primary_channel() -> None:
    primary = np.array([5, 3, 9, 1, 7])
    assert merge_channels(primary, np.array([8, 6]), 4, 0.0).tolist() == [5, 3, 9, 1]


def test_secondary_fills_its_share_without_duplicates() -> None:
    primary = np.array([1, 2, 3, 4, 5, 6])
    secondary = np.array([2, 9, 8, 1, 7])
    out = merge_channels(primary, secondary, 6, 0.5)
    # the primary keeps its top 3; the secondary adds its best 3 not already taken (2 is)
    assert out.tolist() == [1, 2, 3, 9, 8, 7]


def test_short_secondary_is_topped_up_from_the_primary() -> None:
    out = merge_channels(np.array([1, 2, 3, 4, 5]), np.array([1, 9]), 5, 0.8)
    assert out.tolist() == [1, 9, 2, 3, 4]
    assert len(set(out.tolist())) == len(out)


def test_short_lists_and_bad_share() -> None:
    assert merge_channels(np.array([1]), np.array([2]), 5, 0.5).tolist() == [1, 2]
    assert merge_channels(np.array([1]), np.array([2]), 0, 0.5).tolist() == []
    with pytest.raises(ValueError, match="share"):
        merge_channels(np.array([1]), np.array([2]), 2, 1.5)
