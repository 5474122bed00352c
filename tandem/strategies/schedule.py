"""When a device calls the cloud: the fetch and sync schedule, kept apart from the drivers.

River keeps the time logic of progressive validation in ``stream/qa.py``, apart from the
driver; this is Tandem's equivalent. The evaluation and the fleet service both ask it, one
action at a time, so a device fetches at the same moments in both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleConfig:
    """Args:
    session_gap_ms: inactivity that starts a new session (and a sync).
    fetch_every_ms: a device syncs again after this long within a session.
    refetch_every: a device fetches a fresh list after this many engagements within a
        session (a feed asks for its next page; 0 = only at syncs).
    """

    session_gap_ms: int = 30 * 60_000
    fetch_every_ms: int = 30 * 60_000
    refetch_every: int = 1


class SyncSchedule:
    """Per device: does this action come with a fetch, and is that fetch a sync?

    A *sync* is a device's first fetch, a new session or ``fetch_every_ms`` elapsed: the
    device also takes the newest shared reranker, personalizes and considers fetch-time
    uploads. A *fetch* is a sync or ``refetch_every`` engagements since the last fetch: the
    device gets a fresh list, nothing else. Only engagements (prediction points) fetch;
    every action moves the session clock.
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        self._last_ts: dict[int, int] = {}
        self._last_sync: dict[int, int] = {}
        self._since: dict[int, int] = {}

    def step(self, user_id: int, ts_ms: int, engaged: bool) -> tuple[bool, bool]:
        """(fetch, sync) for this action of ``user_id`` at ``ts_ms``; call once per action, in time order."""
        cfg = self.config
        u, t = int(user_id), int(ts_ms)
        lt = self._last_ts.get(u)
        first = u not in self._last_sync
        is_sync = lt is None or t - lt > cfg.session_gap_ms or t - self._last_sync.get(u, t) >= cfg.fetch_every_ms
        fetch = sync = False
        every = cfg.refetch_every
        if engaged and (is_sync or first or (every > 0 and self._since.get(u, 0) >= every)):
            fetch = True
            self._since[u] = 0
            if is_sync or first:
                sync = True
                self._last_sync[u] = t
        if engaged:
            self._since[u] = self._since.get(u, 0) + 1
        self._last_ts[u] = t
        return fetch, sync

    def forget(self, user_id: int) -> None:
        """Drop a device's clock (an evicted device syncs again when it comes back)."""
        for d in (self._last_ts, self._last_sync, self._since):
            d.pop(int(user_id), None)
