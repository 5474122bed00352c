"""A synthetic livestream world with known ground truth.

Why: real logs cannot say *why* a user watched a stream, nor when their taste
changed. This generator can, so the collaboration loop can be checked against
the truth: do devices pick up a taste shift faster than the cloud?

The world:

* categories have latent centroids; streamers have a category, a latent vector
  (centroid + noise) and a log-popularity that drifts day by day (random walk);
* streamers go live on a daily schedule (a preferred evening hour with jitter,
  a per-streamer probability of streaming that day, sessions of log-normal
  length), so who is live changes all the time (``availability``);
* users have a taste vector (their favourite category's centroid, scaled, plus
  noise) and arrive in sessions (evening-heavy) of a few actions each;
* at each action a user looks at ``candidates`` live streams (a random browse
  page plus the streams they watched recently that are live now) and picks one
  by a softmax over ``taste_weight * taste·v + popularity_weight * pop(day)
  + habit_bonus * [watched recently]`` (Gumbel-max sampling);
* the pick emits LIVE_ENTER at the action time and WATCH at the end of the watch
  with the dwell in seconds (longer for better matches); optionally IMPRESSION
  rows for the browse page and a CLICK;
* a taste shift: ``shift_fraction`` of users switch to a new favourite category
  at ``shift_at`` (fraction of the horizon). Habits carry over, which is what
  makes the shift hard for a slow model.

Vectorized: actions are processed in rounds by per-user rank (every user's
first action, then every second action, ...), so the sequential habit state
costs one numpy pass per round, not per event. Deterministic by seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd

from streams.datasets.base import EventLog, finalize_events
from streams.datasets.twitch import live_intervals
from streams.schema import MAX_DWELL_S, EventKind

log = logging.getLogger(__name__)

MINUTE_MS: Final[int] = 60_000
HOUR_MS: Final[int] = 60 * MINUTE_MS
DAY_MS: Final[int] = 24 * HOUR_MS
_KEY: Final[int] = 1 << 40  # item * _KEY + time (times stay below 2**40 ms, 34 years)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and behaviour of the synthetic world.

    Args:
        events: exact number of events in the log.
        seed: everything is a function of the config; the same config gives the same frame.
        users, items: population sizes (default: scaled from ``events``).
        categories, dim: number of streamer categories and latent dimension.
        days: horizon; ``start_ms``: time of the first instant (log-relative 0 by default).
        stream_hours_mean: mean length of a live session. ``stream_prob``: Beta(a, b) of the
            per-streamer probability of going live on a given day.
        popularity_drift: daily s.d. of the log-popularity random walk.
        taste_weight, popularity_weight, habit_bonus: the choice logit's terms.
        habit_memory: how many recent streams count as "watched recently".
        candidates: random live streams looked at per action (plus live recent ones).
        actions_per_session: mean actions in a user session; ``gap_minutes_mean``: mean time between
            actions (the slot a watch can fill).
        impressions: IMPRESSION rows (browse page positions) and a CLICK per action when > 0.
        shift_fraction, shift_at: share of users whose taste shifts, and when (fraction of the horizon).
        bucket_minutes: resolution of the live-stream index used for sampling browse pages.
    """

    events: int = 100_000
    seed: int = 0
    users: int | None = None
    items: int | None = None
    categories: int = 12
    dim: int = 8
    days: float = 14.0
    start_ms: int = 0
    stream_hours_mean: float = 3.0
    stream_prob: tuple[float, float] = (2.0, 3.0)
    popularity_drift: float = 0.25
    taste_weight: float = 1.0
    popularity_weight: float = 1.0
    habit_bonus: float = 3.0
    habit_memory: int = 5
    candidates: int = 24
    actions_per_session: float = 4.0
    gap_minutes_mean: float = 12.0
    impressions: int = 0
    shift_fraction: float = 0.1
    shift_at: float = 0.5
    bucket_minutes: float = 5.0

    def n_users(self) -> int:
        return int(self.users) if self.users else int(np.clip(self.events // 100, 20, 200_000))

    def n_items(self) -> int:
        return int(self.items) if self.items else int(np.clip(2 * math.isqrt(max(self.events, 1)), 20, 20_000))

    def events_per_action(self) -> int:
        return 2 + (self.impressions + 1 if self.impressions > 0 else 0)

    def validate(self) -> None:
        if self.events < 1:
            raise ValueError(f"events must be >= 1, got {self.events}")
        if not 0.0 <= self.shift_fraction <= 1.0:
            raise ValueError(f"shift_fraction must be in [0, 1], got {self.shift_fraction}")
        if not 0.0 <= self.shift_at <= 1.0:
            raise ValueError(f"shift_at must be in [0, 1], got {self.shift_at}")
        if self.days <= 0 or self.days * DAY_MS >= _KEY:
            raise ValueError(f"days must be in (0, {_KEY // DAY_MS}), got {self.days}")
        if self.categories < 2 or self.dim < 1 or self.candidates < 1 or self.habit_memory < 1:
            raise ValueError("categories >= 2, dim >= 1, candidates >= 1 and habit_memory >= 1 are required")
        if self.impressions > self.candidates:
            raise ValueError(f"impressions ({self.impressions}) cannot exceed candidates ({self.candidates})")


class _LiveIndex:
    """Live intervals, queryable two ways: exact liveness of (item, t), and the
    streams live for a whole time bucket (for sampling browse pages)."""

    def __init__(self, item: np.ndarray, start: np.ndarray, end: np.ndarray, horizon_ms: int, bucket_ms: int) -> None:
        key = item * _KEY + start
        order = np.argsort(key, kind="stable")
        self.key, self.item, self.end = key[order], item[order], end[order]
        self.bucket_ms = bucket_ms
        n_buckets = horizon_ms // bucket_ms + 1
        first = -(-start // bucket_ms)  # ceil: first bucket fully inside
        last = end // bucket_ms  # exclusive
        count = np.maximum(last - first, 0)
        rows = np.repeat(np.arange(len(item)), count)
        within = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)
        bucket = first[rows] + within
        order = np.argsort(bucket, kind="stable")
        self.bucket_items = item[rows][order].astype(np.int32)
        self.count = np.bincount(bucket, minlength=n_buckets).astype(np.int64)[:n_buckets]
        self.offset = np.concatenate([[0], np.cumsum(self.count)[:-1]])

    def interval_end(self, item: np.ndarray, t: np.ndarray) -> np.ndarray:
        """End of the interval of ``item`` containing ``t``; -1 where the item is not live at ``t``."""
        pos = np.searchsorted(self.key, item.astype(np.int64) * _KEY + t, side="right") - 1
        p = np.clip(pos, 0, None)
        ok = (pos >= 0) & (self.item[p] == item) & (self.end[p] > t)
        return np.where(ok, self.end[p], -1)

    def sample(self, rng: np.random.Generator, t: np.ndarray, k: int) -> np.ndarray:
        """``k`` streams (with replacement) live during the whole bucket of each ``t``."""
        b = t // self.bucket_ms
        pick = (rng.random((len(t), k)) * self.count[b][:, None]).astype(np.int64)
        return self.bucket_items[self.offset[b][:, None] + pick]


def _schedule(c: SyntheticConfig, rng: np.random.Generator, n_items: int, horizon_ms: int) -> pd.DataFrame:
    """Merged live intervals (ms) of every streamer over the horizon."""
    n_days = int(math.ceil(c.days)) + 1
    prob = rng.beta(c.stream_prob[0], c.stream_prob[1], n_items)
    pref_hour = rng.normal(19.0, 3.0, n_items) % 24.0
    live = rng.random((n_items, n_days)) < prob[:, None]
    day = np.arange(n_days)[None, :] - 1  # day -1: streams already live at t=0
    start_h = day * 24.0 + pref_hour[:, None] + rng.normal(0.0, 1.0, (n_items, n_days))
    sigma = 0.5
    length_h = np.exp(rng.normal(math.log(c.stream_hours_mean) - sigma**2 / 2, sigma, (n_items, n_days)))
    length_h = np.clip(length_h, 0.5, 12.0)
    item = np.broadcast_to(np.arange(n_items)[:, None], live.shape)[live]
    lo = np.clip((start_h[live] * HOUR_MS).astype(np.int64), 0, horizon_ms)
    hi = np.clip(((start_h + length_h)[live] * HOUR_MS).astype(np.int64), 0, horizon_ms)
    keep = hi > lo
    merged = live_intervals(item[keep], lo[keep], hi[keep] - 1, 0)
    return pd.DataFrame({"item_id": merged.item_id.to_numpy(), "start_ms": merged.start_step.to_numpy(), "end_ms": merged.end_step.to_numpy()})


def _actions(
    c: SyntheticConfig, rng: np.random.Generator, weights: np.ndarray, index: _LiveIndex, need: int, horizon_ms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, time, slot length) of exactly ``need`` actions at times when some stream is live."""
    users, times, slots = [], [], []
    have = 0
    p = weights / weights.sum()
    days = max(1, int(math.ceil(c.days)))
    mean_gap = c.gap_minutes_mean * MINUTE_MS
    for _ in range(100):
        if have >= need:
            break
        n_sess = int((need - have) * 1.4 / c.actions_per_session) + 16
        s_user = rng.choice(len(weights), n_sess, p=p)
        hour = np.where(rng.random(n_sess) < 0.7, rng.normal(20.0, 2.5, n_sess) % 24.0, rng.uniform(0.0, 24.0, n_sess))
        s_start = ((rng.integers(0, days, n_sess) * 24.0 + hour) * HOUR_MS).astype(np.int64)
        k = rng.geometric(1.0 / max(c.actions_per_session, 1.0), n_sess)
        sess = np.repeat(np.arange(n_sess), k)
        sigma = 0.8
        gap = np.exp(rng.normal(math.log(mean_gap) - sigma**2 / 2, sigma, len(sess)))
        gap = np.clip(gap, 30_000, 180 * MINUTE_MS).astype(np.int64)
        excl = np.cumsum(gap) - gap
        first = np.cumsum(k) - k
        t = s_start[sess] + excl - np.repeat(excl[first], k)
        ok = t < horizon_ms
        ok[ok] = index.count[t[ok] // index.bucket_ms] > 0
        users.append(s_user[sess][ok])
        times.append(t[ok])
        slots.append(gap[ok])
        have += int(ok.sum())
    if have < need:
        raise ValueError("the synthetic world has too little live time for the requested events; raise items or days")
    u, t, s = np.concatenate(users), np.concatenate(times), np.concatenate(slots)
    if len(u) > need:
        keep = np.sort(rng.choice(len(u), need, replace=False))
        u, t, s = u[keep], t[keep], s[keep]
    return u, t, s


def generate(config: SyntheticConfig | None = None) -> EventLog:
    """Generate the synthetic livestream log described in the module docstring.

    Returns:
        an ``EventLog`` with exactly ``config.events`` events, ``availability`` = the live intervals,
        ``items`` (item_id, category, popularity) and the ground truth in ``meta`` (``user_taste``,
        ``user_category``, ``item_vectors``, ``item_category``, ``popularity_daily``, ``shift``).
    """
    c = config or SyntheticConfig()
    c.validate()
    rng = np.random.default_rng(c.seed)
    n_users, n_items, d = c.n_users(), c.n_items(), c.dim
    horizon_ms = int(c.days * DAY_MS)
    bucket_ms = max(1, int(c.bucket_minutes * MINUTE_MS))

    # -- latent world -------------------------------------------------------
    centroids = rng.normal(size=(c.categories, d))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    item_cat = rng.integers(0, c.categories, n_items)
    item_vec = (centroids[item_cat] + rng.normal(0.0, 0.3, (n_items, d))).astype(np.float32)
    pop_base = rng.normal(0.0, 1.0, n_items)
    n_days = int(math.ceil(c.days)) + 1
    popularity = (pop_base[:, None] + np.cumsum(rng.normal(0.0, c.popularity_drift, (n_items, n_days)), axis=1)).astype(np.float32)
    user_cat = rng.integers(0, c.categories, n_users)
    taste = (2.0 * centroids[user_cat] + rng.normal(0.0, 0.3, (n_users, d))).astype(np.float32)
    activity = rng.lognormal(0.0, 1.0, n_users)

    shift_ms = int(c.shift_at * horizon_ms)
    shifted = np.sort(rng.choice(n_users, int(round(c.shift_fraction * n_users)), replace=False))
    new_cat = (user_cat[shifted] + rng.integers(1, c.categories, len(shifted))) % c.categories
    new_taste = (2.0 * centroids[new_cat] + rng.normal(0.0, 0.3, (len(shifted), d))).astype(np.float32)
    taste_after = taste.copy()
    taste_after[shifted] = new_taste

    # -- who is live when -----------------------------------------------------
    availability = _schedule(c, rng, n_items, horizon_ms)
    index = _LiveIndex(
        availability.item_id.to_numpy(), availability.start_ms.to_numpy(), availability.end_ms.to_numpy(), horizon_ms, bucket_ms
    )

    # -- when users act ---------------------------------------------------------
    per_action = c.events_per_action()
    n_actions = -(-c.events // per_action)
    user, t, slot = _actions(c, rng, activity, index, n_actions, horizon_ms)

    # -- what they pick: rounds by per-user rank ------------------------------------
    by_user = np.lexsort((t, user))
    user, t, slot = user[by_user], t[by_user], slot[by_user]
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    rank = np.arange(len(user)) - np.repeat(first, np.diff(np.r_[first, len(user)]))
    by_rank = np.argsort(rank, kind="stable")
    round_end = np.cumsum(np.bincount(rank))
    k_hab, k_rand = c.habit_memory, c.candidates
    recent = np.full((n_users, k_hab), -1, dtype=np.int64)
    n_recent = np.zeros(n_users, dtype=np.int64)
    chosen = np.empty(len(user), dtype=np.int64)
    affinity = np.empty(len(user), dtype=np.float32)
    habit = np.zeros(len(user), dtype=bool)
    shown = np.empty((len(user), c.impressions), dtype=np.int64) if c.impressions else None
    is_shifted = np.zeros(n_users, dtype=bool)
    is_shifted[shifted] = True
    lo = 0
    chunk = 65_536
    for hi_round in round_end:
        for a in range(lo, int(hi_round), chunk):
            sel = by_rank[a : min(a + chunk, int(hi_round))]
            u, tt = user[sel], t[sel]
            n = len(sel)
            rand = index.sample(rng, tt, k_rand)
            hab = recent[u]
            hab_ok = hab >= 0
            for j in range(1, k_hab):  # count each recent stream once
                hab_ok[:, j] &= ~(hab[:, j : j + 1] == hab[:, :j]).any(axis=1)
            hab_ok &= index.interval_end(np.where(hab >= 0, hab, 0), tt[:, None]) >= 0
            rand_ok = ~(rand[:, :, None] == np.where(hab_ok, hab, -1)[:, None, :]).any(axis=2)
            cands = np.concatenate([np.where(hab >= 0, hab, 0), rand], axis=1)
            ok = np.concatenate([hab_ok, rand_ok], axis=1)
            vec = np.where((tt >= shift_ms)[:, None] & is_shifted[u][:, None], taste_after[u], taste[u])
            aff = np.einsum("nd,ncd->nc", vec, item_vec[cands])
            day = np.minimum(tt // DAY_MS, n_days - 1)
            logit = c.taste_weight * aff + c.popularity_weight * popularity[cands, day[:, None]]
            logit[:, :k_hab] += c.habit_bonus
            logit = np.where(ok, logit + rng.gumbel(size=logit.shape), -np.inf)
            col = np.argmax(logit, axis=1)
            rows = np.arange(n)
            pick = cands[rows, col]
            chosen[sel] = pick
            affinity[sel] = aff[rows, col]
            habit[sel] = col < k_hab
            recent[u, n_recent[u] % k_hab] = pick
            n_recent[u] += 1
            if shown is not None:
                page = rand[:, : c.impressions].copy()
                missing = ~(page == pick[:, None]).any(axis=1)
                pos = rng.integers(0, c.impressions, n)
                page[rows[missing], pos[missing]] = pick[missing]
                shown[sel] = page
        lo = int(hi_round)

    # -- dwell and events ------------------------------------------------------------------
    end = index.interval_end(chosen, t)
    assert (end > t).all(), "a chosen stream was not live"
    # a user's sessions may overlap: a watch ends before the same user's next action starts
    same_user_next = np.r_[user[1:] == user[:-1], False]
    slot = np.where(same_user_next, np.minimum(slot, np.r_[t[1:], 0] - t), slot)
    frac = 1.0 / (1.0 + np.exp(-(1.5 * (affinity - 1.0) + 0.5 * habit + rng.normal(0.0, 0.5, len(t)))))
    dwell_ms = np.minimum((frac * slot).astype(np.int64), np.maximum(slot - 1000, 0))
    dwell_ms = np.clip(np.minimum(dwell_ms, end - t - 1), 0, int(MAX_DWELL_S * 1000))
    cols_ts = [t, t + dwell_ms]
    cols_item = [chosen, chosen]
    cols_val = [np.zeros(len(t), np.float32), (dwell_ms / 1000.0).astype(np.float32)]
    cols_kind = [int(EventKind.LIVE_ENTER), int(EventKind.WATCH)]
    if shown is not None:
        cols_ts = [t] * (c.impressions + 1) + cols_ts
        cols_item = [shown[:, j] for j in range(c.impressions)] + [chosen] + cols_item
        cols_val = [np.full(len(t), j, np.float32) for j in range(c.impressions)] + [np.zeros(len(t), np.float32)] + cols_val
        cols_kind = [int(EventKind.IMPRESSION)] * c.impressions + [int(EventKind.CLICK)] + cols_kind
    ts = np.stack(cols_ts, axis=1).ravel()
    order = np.argsort(ts, kind="stable")[: c.events]
    p = len(cols_ts)
    frame = pd.DataFrame(
        {
            "event_id": np.arange(len(order), dtype=np.uint64),
            "ts_ms": ts[order] + c.start_ms,
            "user_id": np.repeat(user, p)[order],
            "item_id": np.stack(cols_item, axis=1).ravel()[order],
            "value": np.stack(cols_val, axis=1).ravel()[order],
            "kind": np.tile(np.array(cols_kind, dtype=np.uint8), len(t))[order],
        }
    )
    habit_share = float(habit.mean()) if len(habit) else 0.0
    # free the per-action arrays before finalize_events copies and sorts the table (peak memory)
    del ts, order, cols_ts, cols_item, cols_val, user, t, slot, chosen, affinity, habit, end, frac, dwell_ms
    del by_user, by_rank, rank, recent, shown
    events = finalize_events(frame)
    del frame
    availability = availability.assign(start_ms=availability.start_ms + c.start_ms, end_ms=availability.end_ms + c.start_ms)
    items = pd.DataFrame({"item_id": np.arange(n_items), "category": item_cat.astype(np.int64), "popularity": pop_base.astype(np.float32)})
    meta: dict[str, Any] = {
        "source": "synthetic",
        "licence": "generated; no terms",
        "config": dataclasses.asdict(c),
        "choice_logit": "taste_weight * taste.v + popularity_weight * popularity[item, day] + habit_bonus * [in last habit_memory watched]",
        "user_taste": taste,
        "user_category": user_cat,
        "item_vectors": item_vec,
        "item_category": item_cat,
        "category_centroids": centroids.astype(np.float32),
        "popularity_daily": popularity,
        "day_ms": DAY_MS,
        "shift": {
            "users": shifted,
            "ts_ms": shift_ms + c.start_ms,
            "old_taste": taste[shifted],
            "new_taste": new_taste,
            "old_category": user_cat[shifted],
            "new_category": new_cat,
        },
        "habit_share": habit_share,
    }
    log.info(
        "synthetic: %d events, %d users, %d streamers, %d live intervals, %.0f%% habit picks",
        len(events), n_users, n_items, len(availability), 100 * meta["habit_share"],
    )  # fmt: skip
    return EventLog(name="synthetic", events=events, items=items, availability=availability, step_ms=1000, meta=meta)
