"""Twitch livestream logs (Rappaz, McAuley and Aberer, RecSys 2021) as an event log.

Two layouts are read:

* the community subset (``twitch105k.csv``): header ``,user_id,streamer_name,start_time,community``
  where the unnamed first column is the row index in the original 100k file and the stop time
  was dropped upstream;
* the original ``100k_a.csv`` layout, no header: ``user, stream_id, streamer, start, stop``
  (streamer names are strings there and get stable integer codes).

Times are 10-minute steps. Rows are grouped by user in the files, so events are
sorted by (step, original row index).

Availability estimator: the log does not say when a streamer was live, only when
someone started watching (and, in the 100k layout, stopped). A watch session
spanning steps ``[start, end]`` (``end = stop`` when known, else ``start``) says
the streamer was live then. ``w = live_window_steps`` says how long a stream is
assumed to stay up after the last viewer seen; ``live_window`` says where the
window lies:

* ``"past"`` (default): ``[start, end + w + 1)``. A streamer is live at step ``t``
  when someone started watching it within the last ``w`` steps (or is still
  watching, when stops are known); never before the first watch start seen, so a
  replay that asks "who is live now" learns nothing about the future.
* ``"centered"``: ``[start - w, end + w + 1)``, widened on both sides. It also
  calls a streamer live up to ``w`` steps *before* anyone watches it, i.e. it looks
  ahead; kept only to compare with the past-only estimate.

Overlapping windows of a streamer are merged into live intervals. Either way the
window starts at or before the watch start (inclusive), so every event has its
own streamer live at its time; a streamer watched at steps 10 and 14 with
``w = 3`` is one continuous stream ``[10, 18)`` in the past-only estimate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final, Literal, get_args

import numpy as np
import pandas as pd

from streams.datasets.base import EventLog, finalize_events
from streams.datasets.checks import check_columns
from streams.schema import MAX_DWELL_S, EventKind

log = logging.getLogger(__name__)

STEP_MS: Final[int] = 600_000
#: Where the live window lies around a watch: after it only, or on both sides (looks ahead).
LiveWindow = Literal["past", "centered"]
LIVE_WINDOWS: Final[tuple[str, ...]] = get_args(LiveWindow)
#: Steps (10 minutes each) a stream stays live after a watch (and before it, when centered).
DEFAULT_LIVE_WINDOW_STEPS: Final[int] = 3
DEFAULT_LIVE_WINDOW: Final[LiveWindow] = "past"
LICENCE: Final[str] = (
    "Twitch 100k dataset, Rappaz, McAuley and Aberer, 'Recommendation on Live-Streaming Platforms: "
    "Dynamic Availability and Repeat Consumption', RecSys 2021: research use with citation; "
    "redistribution not confirmed, never commit the file."
)
#: Accepted header spellings -> canonical column.
_ALIASES: Final[dict[str, str]] = {
    "user_id": "user", "user": "user", "userid": "user",
    "stream_id": "stream_id", "stream": "stream_id",
    "streamer_name": "streamer", "streamer": "streamer", "streamer_id": "streamer",
    "start_time": "start", "start": "start", "time_start": "start",
    "stop_time": "stop", "stop": "stop", "time_stop": "stop", "end": "stop",
    "community": "community",
}  # fmt: skip


def _read(path: Path) -> tuple[pd.DataFrame, str]:
    """Raw rows with canonical columns (row, user, streamer, start[, stop][, community]) and the layout name."""
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").strip()
    if not first:
        raise ValueError(f"{path}: empty Twitch file")
    fields = [f.strip().lower() for f in first.split(",")]
    has_header = any(f in _ALIASES for f in fields)
    try:
        if has_header:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
            cols = []
            for i, name in enumerate(raw.columns):
                key = str(name).strip().lower()
                if i == 0 and (key == "" or key.startswith("unnamed")):
                    cols.append("row")
                else:
                    cols.append(_ALIASES.get(key, key))
            raw.columns = cols
            layout = "community-subset" if "stop" not in cols else "header"
            first_line = 2
        else:
            raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
            if raw.shape[1] != 5:
                raise ValueError(
                    f"{path}: line 1 has {raw.shape[1]} fields; expected a header, or the 100k layout "
                    "user,stream_id,streamer,start,stop"
                )
            raw.columns = ["user", "stream_id", "streamer", "start", "stop"]
            layout = "100k"
            first_line = 1
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: cannot parse Twitch log ({exc})") from None
    missing = [c for c in ("user", "streamer", "start") if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}")
    if "row" not in raw.columns:
        raw["row"] = np.arange(len(raw)).astype(str)
    out = pd.DataFrame(index=raw.index)
    numeric = ["row", "user", "start"] + [c for c in ("stop", "community") if c in raw.columns]
    checked = check_columns(path, raw, ids=numeric, first_line=first_line)  # steps are integers too
    for col in ("start", "stop"):
        if col in checked:  # in ms they must fit the schema (no int64 overflow downstream)
            check_columns(path, {col: checked[col]}, ts=col, unit="step", step_ms=STEP_MS, first_line=first_line)
    for col in numeric:
        out[col] = checked[col]
    streamer_num = pd.to_numeric(raw["streamer"], errors="coerce")
    if streamer_num.notna().all():
        out["streamer"] = check_columns(path, raw, ids=("streamer",), first_line=first_line)["streamer"]
        names = None
    else:
        names = np.sort(raw["streamer"].unique())
        out["streamer"] = np.searchsorted(names, raw["streamer"].to_numpy()).astype(np.int64)
    if "stop" in out.columns:
        bad = out["stop"].to_numpy() < out["start"].to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: line {row + first_line}, column stop: stop {out['stop'].iloc[row]} < start")
    if names is not None:
        out.attrs["names"] = names
    return out, layout


def live_intervals(
    item: np.ndarray, start: np.ndarray, end: np.ndarray, window: int, mode: LiveWindow = DEFAULT_LIVE_WINDOW
) -> pd.DataFrame:
    """Merge per-session windows into per-item live intervals (steps).

    Args:
        item: streamer per session. start, end: first and last step of the session (inclusive).
        window: ``w`` in steps: how long a stream stays live after ``end``.
        mode: ``"past"``: ``[start, end + w + 1)``; ``"centered"``: ``[start - w, end + w + 1)``
            (live ``w`` steps before anyone watched: looks ahead). Same result when ``w = 0``.

    Returns:
        ``item_id, start_step, end_step`` (end exclusive), sorted by item then start, non-overlapping.
    """
    if mode not in LIVE_WINDOWS:
        raise ValueError(f"live window mode must be one of {list(LIVE_WINDOWS)}, got {mode!r}")
    if len(item) == 0:
        return pd.DataFrame({"item_id": np.empty(0, np.int64), "start_step": np.empty(0, np.int64), "end_step": np.empty(0, np.int64)})
    lo = np.asarray(start, dtype=np.int64) - (window if mode == "centered" else 0)
    hi = np.asarray(end, dtype=np.int64) + window + 1
    item = np.asarray(item, dtype=np.int64)
    order = np.lexsort((lo, item))
    item, lo, hi = item[order], lo[order], hi[order]
    # running max of ends within each item: a window starts a new interval when it begins after it
    cummax = pd.Series(hi).groupby(item).cummax().to_numpy()
    new = np.ones(len(item), dtype=bool)
    new[1:] = (item[1:] != item[:-1]) | (lo[1:] > cummax[:-1])
    starts = np.flatnonzero(new)
    ends = np.maximum.reduceat(hi, starts)
    return pd.DataFrame({"item_id": item[starts], "start_step": lo[starts], "end_step": ends})


def availability_stats(log_: EventLog) -> dict[str, float]:
    """How well the availability covers the log: share of events whose item is live at their time,
    and the mean number of live items per step over the log's span."""
    a = log_.availability
    if a is None or len(a) == 0:
        return {"events_item_live": float("nan"), "mean_live_per_step": float("nan"), "intervals": 0}
    ev = log_.events
    key_start = a.item_id.to_numpy() * (1 << 40) + a.start_ms.to_numpy()
    order = np.argsort(key_start, kind="stable")
    ks, ends, items = key_start[order], a.end_ms.to_numpy()[order], a.item_id.to_numpy()[order]
    q = ev.item_id.to_numpy() * (1 << 40) + ev.ts_ms.to_numpy()
    pos = np.searchsorted(ks, q, side="right") - 1
    ok = (pos >= 0) & (items[np.clip(pos, 0, None)] == ev.item_id.to_numpy()) & (ends[np.clip(pos, 0, None)] > ev.ts_ms.to_numpy())
    step = log_.step_ms
    t0, t1 = int(ev.ts_ms.min()), int(ev.ts_ms.max()) + step
    live_steps = (np.minimum(a.end_ms.to_numpy(), t1) - np.maximum(a.start_ms.to_numpy(), t0)).clip(0) / step
    return {
        "events_item_live": float(ok.mean()),
        "mean_live_per_step": float(live_steps.sum() / ((t1 - t0) / step)),
        "intervals": int(len(a)),
    }


def load_twitch(
    path: str | Path, live_window_steps: int = DEFAULT_LIVE_WINDOW_STEPS, live_window: LiveWindow = DEFAULT_LIVE_WINDOW
) -> EventLog:
    """Load a Twitch livestream log as a time-sorted ``EventLog``.

    Args:
        path: the CSV file (or a folder holding exactly one ``*.csv``).
        live_window_steps: ``w``, how many 10-minute steps a streamer stays live after a watch
            (start, or stop when known); see the module docstring for the estimator.
        live_window: ``"past"`` (default): live from each watch start to ``w`` steps after, from past
            events only; ``"centered"``: also ``w`` steps before each watch start (looks ahead, for
            comparison with earlier runs).

    Returns:
        LIVE_ENTER events at the start step (and LIVE_LEAVE at the stop step with the dwell in seconds
        when stop times exist), ``item_id`` = streamer code, ``ts_ms = step * 600_000``; ``items.category``
        = community (0 when absent); ``availability`` = estimated live intervals in ms.
    """
    if live_window_steps < 0:
        raise ValueError(f"live_window_steps must be >= 0, got {live_window_steps}")
    if live_window not in LIVE_WINDOWS:
        raise ValueError(f"live_window must be one of {list(LIVE_WINDOWS)}, got {live_window!r}")
    p = Path(path)
    if p.is_dir():
        csvs = sorted(p.glob("*.csv"))
        if len(csvs) != 1:
            raise ValueError(f"{p}: expected exactly one Twitch .csv in the folder, found {[c.name for c in csvs]}")
        p = csvs[0]
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    raw, layout = _read(p)
    raw = raw.sort_values(["start", "row"], kind="stable").reset_index(drop=True)
    has_stop = "stop" in raw.columns
    n = len(raw)
    enter = pd.DataFrame(
        {
            "ts_ms": raw.start.to_numpy() * STEP_MS,
            "user_id": raw.user.to_numpy(),
            "item_id": raw.streamer.to_numpy(),
            "value": np.zeros(n, dtype=np.float32),
            "kind": np.full(n, int(EventKind.LIVE_ENTER), dtype=np.uint8),
            "row": raw.row.to_numpy(),
            "_order": np.ones(n, dtype=np.int8),
        }
    )
    parts = [enter]
    if has_stop:
        dwell = (raw.stop.to_numpy() - raw.start.to_numpy()) * (STEP_MS / 1000.0)
        clipped = int((dwell > MAX_DWELL_S).sum())
        if clipped:
            log.warning("%s: %d watch sessions longer than a day; dwell clipped to %.0f s", p, clipped, MAX_DWELL_S)
        parts.append(
            pd.DataFrame(
                {
                    "ts_ms": raw.stop.to_numpy() * STEP_MS,
                    "user_id": raw.user.to_numpy(),
                    "item_id": raw.streamer.to_numpy(),
                    "value": np.minimum(dwell, MAX_DWELL_S).astype(np.float32),
                    "kind": np.full(n, int(EventKind.LIVE_LEAVE), dtype=np.uint8),
                    "row": raw.row.to_numpy(),
                    "_order": np.zeros(n, dtype=np.int8),  # a leave at step t precedes an enter at t
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True).sort_values(["ts_ms", "_order", "row"], kind="stable")
    events = finalize_events(frame.drop(columns=["_order", "row"]).reset_index(drop=True))

    end_step = raw.stop.to_numpy() if has_stop else raw.start.to_numpy()
    steps = live_intervals(raw.streamer.to_numpy(), raw.start.to_numpy(), end_step, live_window_steps, live_window)
    availability = pd.DataFrame(
        {
            "item_id": steps.item_id.to_numpy(),
            "start_ms": np.maximum(steps.start_step.to_numpy(), 0) * STEP_MS,  # wire times are >= 0
            "end_ms": steps.end_step.to_numpy() * STEP_MS,
        }
    )
    item_ids = np.unique(raw.streamer.to_numpy())
    if "community" in raw.columns:
        community = raw.groupby("streamer").community.agg(lambda s: s.value_counts().index[0])
        category = community.reindex(item_ids).to_numpy().astype(np.int64)
    else:
        category = np.zeros(len(item_ids), dtype=np.int64)
    items = pd.DataFrame({"item_id": item_ids, "category": category})
    names = raw.attrs.get("names")
    if names is not None:
        items["name"] = names[item_ids]
    result = EventLog(
        name="twitch",
        events=events,
        items=items,
        availability=availability,
        step_ms=STEP_MS,
        meta={
            "source": str(p),
            "layout": layout,
            "licence": LICENCE,
            "live_window_steps": live_window_steps,
            "live_window": live_window,
            "availability_estimator": (
                f"per watch session [start{f' - {live_window_steps}' if live_window == 'centered' else ''}, "
                f"end + {live_window_steps} + 1) steps ({live_window}), end = stop when known else start; "
                "overlapping windows merged per streamer"
            ),
        },
    )
    stats = availability_stats(result)
    result.meta["availability_stats"] = stats
    log.info(
        "loaded %d Twitch events from %s (%d users, %d streamers); %.1f%% events with their streamer live, %.1f live per step",
        len(events), p, result.n_users, len(item_ids), 100 * stats["events_item_live"], stats["mean_live_per_step"],
    )  # fmt: skip
    return result
