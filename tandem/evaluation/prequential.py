"""Prequential (test-then-train) replay of an event log through the whole device-cloud loop.

Protocol (River's ``progressive_val_score`` applied to a recommender system):

* Events are replayed in time order in mini-batches of ``batch_size``. The cloud
  ingests (trains on) a mini-batch only after every prediction inside it was made,
  so a prediction never sees its own event or any later one.
* Every positive interaction is a prediction point: the ranking the user would
  see at that moment is scored against the item they engaged with, then every
  learner (cloud, devices, baselines) learns from the event.
* The cloud refreshes every ``refresh_every`` events: it rebuilds the served item
  vectors (its index), and each strategy runs an aggregation round over the device
  updates received since the last one. Lists served between refreshes come from the
  last snapshot (staleness is part of the protocol, and is measured).
* A device syncs at a session start (gap > ``session_gap_ms``) and every
  ``fetch_every_ms`` (new reranker, personalization, fetch-time uploads) and fetches a
  fresh list after every ``refetch_every`` engagements; each fetch carries its recent
  items (``cloud_recsys.recommender.Session``), from which the cloud builds the query.
  Between fetches it shows its cached list: cloud-only with the filter any client
  applies; device strategies rerank it on every action with fresh context.
* Livestreams are availability-aware (Rappaz et al., RecSys 2021): the cloud only
  retrieves items live at fetch time, devices filter to items live now.
* Feeds without repeats (``domain``, see ``resolve_domain``): the cloud excludes every item
  the device reports consumed; devices and cloud-only's display drop them too.
* Baselines (``baselines.py``) are scored on the same points.

Layout: this module is the thin driver (``run_prequential``, ``_run``: serve, test, learn,
aggregate, per window); ``protocol.py`` holds what is predicted when and against what
(config, prediction points, fetch/sync flags, relevant sets, availability, domain),
``waves.py`` the device work of a window (one implementation, run here or in a shard),
``parallel.py`` the multi-process runner (strategies split over processes) and ``shards.py``
the Ray runner (one replay's devices split by user over actors).

Sharing work: one cloud training pass serves every strategy. Strategy-specific
cloud state (interest vectors, item-row deltas, reranker weights) is an overlay on
the shared model (``StrategyCloud``); retrieval is batched over all fetches of a
mini-batch and shared between strategies whose overlays are empty.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from streams.candidates import Candidates
from device_rerank.config import DeviceConfig, RerankerConfig
from device_rerank.envelope import DecodedUpdate, Keyring, UpdateRejected, UpdateVerifier
from device_rerank.reranker import Reranker
from streams.batch import EventBatch
from streams.datasets.base import EventLog
from streams.schema import POSITIVE_KINDS
from tandem.evaluation.baselines import DESCRIPTIONS as _BASELINE_DESC
from tandem.evaluation.baselines import Baselines
from tandem.evaluation.clouds import recommender_for
from tandem.evaluation.bootstrap import bootstrap_many, paired_relative_diff
from tandem.evaluation.metrics import PredictionLog, device_days, latency_summary, metric_names, ndcg_at_k, per_point_values, time_series
from tandem.evaluation.parallel import run_parallel
from tandem.evaluation.protocol import (
    CloudFactory,
    CloudModel,
    EvalConfig,
    LiveIndex,
    prediction_points,
    relevant_sets,
    resolve_domain,
    sync_flags,
    user_events,
    window_requests,
)
from tandem.evaluation import saved
from tandem.evaluation.results import EvaluationResult, Points, StrategyResult
from tandem.evaluation.waves import Fleets, LocalFleets, Shown, Window, latency_flags
from tandem.strategies.base import Strategy
from tandem.strategies.fleet import StrategyFleet
from tandem.strategies.server import StrategyCloud, serve_candidates, verifier_for

logger = logging.getLogger(__name__)

_POS = np.array(sorted(int(k) for k in POSITIVE_KINDS), dtype=np.uint8)


# -- per-strategy run state -------------------------------------------------------------
@dataclass
class _Run:
    strategy: Strategy
    cloud: StrategyCloud
    verifier: UpdateVerifier
    fleet: StrategyFleet
    log: PredictionLog
    latencies: list[float] = field(default_factory=list)
    update_staleness: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    list_age_ms: list[int] = field(default_factory=list)
    bytes_request: int = 0

    @property
    def label(self) -> str:
        return self.strategy.label


# -- the loop ----------------------------------------------------------------------
def run_prequential(
    log: EventLog,
    strategies: Sequence[Strategy],
    config: EvalConfig | None = None,
    cloud_factory: CloudFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    reference: str = "cloud-only",
    workers: int = 1,
    save_to: Path | str | None = None,
    fleet_shards: int = 0,
) -> EvaluationResult:
    """Replay ``log`` through every strategy on the same events; returns the summaries.

    Args:
        log: time-sorted event log.
        strategies: strategy instances (labels must be unique).
        config: protocol knobs.
        cloud_factory: builds the shared cloud (default: ``clouds.recommender_for``).
        progress: called as ``progress(events_done, events_total)`` after each mini-batch; with
            several workers, summed over them (total = events x workers, reached when all end).
        reference: label the relative differences are computed against.
        workers: replay processes (forked; POSIX only). Strategies are split into groups
            of similar cost; each process trains its own copy of the (deterministic) cloud
            and replays its group on the same events, and the results are merged. Device
            simulation is >90% of the time and independent between strategies, so this
            divides wall time by up to ``workers`` when cores are free.
        save_to: a folder to save the trained cloud and each strategy's shared reranker in
            at the end (``saved.py``: layout, and ``load_saved`` to read it back).
        fleet_shards: 0 (default) drives every device in this process; N > 0 splits the
            devices of each strategy that reranks over N Ray actors by user
            (``user_id % N``; ``shards.py``), with the same results. Not with ``workers > 1``.
    """
    config = config or EvalConfig()
    labels = [s.label for s in strategies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"strategy labels must be unique: {labels}")
    if fleet_shards < 0:
        raise ValueError(f"fleet_shards must be 0 or more, got {fleet_shards}")
    if fleet_shards > 0 and workers > 1:
        raise ValueError("fleet_shards and workers > 1 cannot be combined: Ray shards the devices of one replay process")
    if workers > 1 and len(strategies) > 1:
        result = run_parallel(log, strategies, config, cloud_factory, progress, reference, workers, save_to)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny per-user forwards: thread fan-out costs 5x more than it saves
        try:
            result = _run(log, strategies, config, cloud_factory, progress, reference, save_to=save_to, fleet_shards=fleet_shards)
        finally:
            torch.set_num_threads(threads)
        _compare(result.results, reference, config)
    if save_to is not None:
        saved.write_manifest(save_to, result.source, result.n_events, config.seed, [(s.label, s.name) for s in strategies])
    return result


def _run(
    log: EventLog,
    strategies: Sequence[Strategy],
    config: EvalConfig,
    cloud_factory: CloudFactory | None,
    progress: Callable[[int, int], None] | None,
    reference: str,
    baselines: bool = True,
    save_to: Path | str | None = None,
    save_cloud: bool = True,
    fleet_shards: int = 0,
) -> EvaluationResult:
    """One replay of ``strategies``; ``vs_reference`` is left empty (the caller compares once, on all results).

    ``save_to``: save this replay's strategies (and the cloud, with ``save_cloud``) there at the end.
    ``fleet_shards``: drive the fleets with devices in this many Ray actors (0: in process).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {"cloud_train_s": 0.0, "retrieval_s": 0.0, "devices_s": 0.0, "rounds_s": 0.0, "baselines_s": 0.0}
    whole = EventBatch.from_frame(user_events(log, config))
    n = len(whole)
    users, ts, items, kinds, vals = whole.user_id, whole.ts_ms, whole.item_id, whole.kind, whole.value
    is_pos_raw = np.isin(kinds, _POS)
    is_pos = prediction_points(users, ts, items, is_pos_raw, config.session_gap_ms)
    live = LiveIndex(log)
    repeat_domain = resolve_domain(config.domain, live.enabled, users, items, np.isin(kinds, _POS))
    fetch, sync = sync_flags(users, ts, is_pos, config)
    relevant = relevant_sets(users, ts, items, is_pos, config)
    logger.info("replaying %d events (%d prediction points, %d fetches), repeat_domain=%s", n, int(is_pos.sum()), int(fetch.sum()), repeat_domain)

    torch.manual_seed(config.seed)

    def live_ids(t: int) -> np.ndarray | None:
        lv = live.at(int(t))
        return None if lv is None else lv[0]

    allowed_at = live_ids if live.enabled else None
    cloud = (cloud_factory or recommender_for)(log, config, not repeat_domain, allowed_at)
    dim = cloud.dim
    base_reranker = Reranker(RerankerConfig(emb_dim=dim))
    base_device = DeviceConfig(exclude_consumed=not repeat_domain, inject_live_recall=repeat_domain, seed=config.seed)
    runs: list[_Run] = []
    for s in strategies:
        s.reset()
        keyring = Keyring(f"tandem-eval-{config.seed}-{s.label}".encode().ljust(16, b"."))
        sc = StrategyCloud(
            base_reranker, config.data_fit_steps, config.data_fit_lr, config.data_fit_l2, config.trust_radius,
            config.trial_min_devices, config.trial_max_rounds,
        )  # shared until a strategy changes it (copy on write)
        fleet = StrategyFleet(s, sc.reranker, sc.model_version, base_device, keyring, config.min_new_engagements)
        verifier = verifier_for(keyring, base_reranker, fleet.device_config, config.max_staleness_rounds)
        runs.append(_Run(s, sc, verifier, fleet, PredictionLog(config.ks)))

    simple = Baselines(repeat_domain, config.k, config.session_gap_ms)
    base_logs = {name: PredictionLog(config.ks) for name in simple.names} if baselines else {}
    engaged: dict[int, set[int]] = {}
    sessions: dict[int, deque[tuple[int, int]]] = {}  # what each device sends with a fetch
    session_len = cloud.config.session_len
    stream_stale_sum = 0.0
    stream_stale_n = 0
    pending_ingested: list[tuple[int, int]] = []  # (first pos, last pos) of ingested windows since refresh
    since_refresh = 0
    round_no = 0

    for r in runs:
        r.cloud.refresh(cloud)

    # the fleets with devices: driven here, or split by user over Ray actors (``shards.py``)
    devs = [(ri, r) for ri, r in enumerate(runs) if r.strategy.rerank]
    dev_index = {ri: fi for fi, (ri, _) in enumerate(devs)}
    trial_sent: dict[int, int] = {}  # fleet index -> the trial version its devices score (-1: none)
    fleets: Fleets = LocalFleets([r.fleet for _, r in devs])
    if fleet_shards > 0 and devs:
        from tandem.evaluation.shards import FleetShards

        fleets = FleetShards([r.fleet for _, r in devs], fleet_shards)
    try:
        for w0 in range(0, n, config.batch_size):
            w1 = min(n, w0 + config.batch_size)
            # ---- serve: batched retrieval for every fetch in this window (state at window start)
            t0 = time.perf_counter()
            fidx = np.flatnonzero(fetch[w0:w1]) + w0
            served: dict[int, dict[int, Candidates]] = {}
            if len(fidx):
                served_reqs = window_requests(fidx, users, ts, items, is_pos_raw, w0, sessions, engaged, session_len, repeat_domain, allowed_at)
                by_key: dict[str, dict[int, Candidates]] = {}
                request_bytes = sum(req.session.nbytes + 16 for req in served_reqs)  # every strategy's devices send the same requests
                for ri, r in enumerate(runs):
                    key = "base" if r.cloud.overlay_empty else r.label
                    if key not in by_key:
                        cl = serve_candidates(r.cloud, cloud, served_reqs, config.k)
                        by_key[key] = dict(zip(fidx.tolist(), cl))
                    served[ri] = by_key[key]
                    r.bytes_request += request_bytes
            timings["retrieval_s"] += time.perf_counter() - t0
            if base_logs:
                simple.start_window(max(config.k * 4, 400))

            lives: list[set[int] | None] = []
            for t in ts[w0:w1].tolist():
                lv = live.at(t)
                lives.append(lv[1] if lv is not None else None)

            # ---- fleets with devices: each device's events in order, batched across devices. In
            # process this runs now; shards run it while this process goes on with the window
            td = time.perf_counter()
            if devs:
                window = Window(np.arange(w0, w1), users[w0:w1], ts[w0:w1], items[w0:w1], kinds[w0:w1], vals[w0:w1], is_pos[w0:w1], fetch[w0:w1], sync[w0:w1], lives)
                timed = latency_flags(window, [len(r.log) for _, r in devs], config.latency_sample_every)
                pending = fleets.start_window(window, [served.get(ri, {}) for ri, _ in devs], timed, max(config.ks))
            timings["devices_s"] += time.perf_counter() - td

            # ---- test, then learn: baselines, bookkeeping and fleets without devices event by event
            plain = [(ri, r) for ri, r in enumerate(runs) if not r.strategy.rerank]
            rep_w = np.zeros(w1 - w0, dtype=bool)
            for j in range(w0, w1):
                u, t, it = int(users[j]), int(ts[j]), int(items[j])
                live_set = lives[j - w0]
                pos = bool(is_pos[j])
                if pos:
                    hist = engaged.setdefault(u, set())
                    rep = rep_w[j - w0] = it in hist
                    rel = relevant[j]
                if pos and base_logs:
                    tb = time.perf_counter()
                    for name, ranking in simple.rankings(u, t, live_set, None if repeat_domain else hist).items():
                        base_logs[name].add(u, t, ranking, it, rep, rel)
                    timings["baselines_s"] += time.perf_counter() - tb
                if pos and plain:
                    td = time.perf_counter()
                    for ri, r in plain:
                        if fetch[j]:
                            r.fleet.receive(u, t, served[ri][j], bool(sync[j]), tag=j)
                        ranking = r.fleet.ranking(u, t, live_set, None if repeat_domain else hist)
                        r.log.add(u, t, ranking[: max(config.ks)], it, rep, rel)
                        ca = r.fleet.cached_at.get(u)
                        if ca is not None:
                            r.list_age_ms.append(t - ca)
                    timings["devices_s"] += time.perf_counter() - td
                if pos:
                    engaged[u].add(it)
                    if base_logs:
                        simple.learn(u, it, t)
                elif is_pos_raw[j]:
                    engaged.setdefault(u, set()).add(it)
                    if base_logs:
                        simple.observe(u, it, t)
                if is_pos_raw[j]:
                    d = sessions.get(u)
                    if d is None:
                        d = sessions[u] = deque(maxlen=session_len)
                    d.append((it, t))
            # ---- the cloud ingests the window (after every prediction in it)
            t0 = time.perf_counter()
            wb = whole.take(np.arange(w0, w1))
            cloud.ingest(wb)
            if base_logs:
                pw = np.flatnonzero(is_pos_raw[w0:w1]) + w0
                simple.ingest(users[pw], items[pw], ts[pw])
            pending_ingested.append((w0, w1))
            timings["cloud_train_s"] += time.perf_counter() - t0

            # ---- what the fleets with devices showed (shards: wait for them), logged in event order
            td = time.perf_counter()
            if devs:
                _log_shown(window, [r for _, r in devs], fleets.finish_window(pending), rep_w, relevant)
            timings["devices_s"] += time.perf_counter() - td
            since_refresh += w1 - w0

            # ---- refresh + aggregation round
            if since_refresh >= config.refresh_every or w1 == n:
                t0 = time.perf_counter()
                round_no += 1
                since_refresh = 0
                for a, b in pending_ingested:
                    stream_stale_sum += float(((w1 - 1) - np.arange(a, b)).sum())
                    stream_stale_n += b - a
                pending_ingested = []
                cloud.refresh()
                new_models: dict[int, tuple[Reranker, int]] = {}
                new_trials: dict[int, tuple[Reranker | None, int]] = {}
                for ri, r in enumerate(runs):
                    updates: list[DecodedUpdate] = []
                    r.verifier.current_model_version = r.cloud.version
                    fi = dev_index.get(ri)
                    outbox = r.fleet.take_outbox() if fi is None else fleets.take_outbox(fi)
                    for raw, sent_at in sorted(outbox, key=lambda x: x[1]):  # event order (stable)
                        try:
                            updates.append(r.verifier.verify(raw))
                            r.update_staleness.append(w1 - sent_at)
                        except UpdateRejected:
                            pass
                    summary = r.strategy.aggregate(round_no, updates, r.cloud)
                    decided = len(r.cloud.trial_log)
                    shipped = r.cloud.refresh(cloud)
                    trial = (r.cloud.trial, r.cloud.trial_version)
                    if fi is None:
                        if shipped:
                            r.fleet.set_model(r.cloud.reranker, r.cloud.model_version)
                        r.fleet.set_trial(*trial)
                    else:
                        if shipped:
                            new_models[fi] = (r.cloud.reranker, r.cloud.model_version)
                        if trial[1] != trial_sent.get(fi, -1):
                            new_trials[fi] = trial
                            trial_sent[fi] = trial[1]
                    if len(r.cloud.trial_log) > decided:
                        summary = {**summary, "trial": r.cloud.trial_log[-1]}
                    r.rounds.append(summary)
                fleets.set_models(new_models, new_trials)
                timings["rounds_s"] += time.perf_counter() - t0
            if progress is not None:
                progress(w1, n)
        traffic = fleets.traffic()  # per fleet with devices: (bytes up, bytes down, uploads)
    finally:
        fleets.close()

    if save_to is not None:
        if save_cloud:
            saved.save_cloud(save_to, cloud)
        for r in runs:
            saved.save_strategy(save_to, r.label, r.cloud)
    wall = time.perf_counter() - t_start
    timings["other_s"] = max(0.0, wall - sum(timings.values()))
    timings["replay_total_s"] = wall
    timings.update(fleets.timings())  # device work itself (with shards: the busiest shard's per window, and the overheads)
    dd = device_days(users, ts)
    stream_stale = stream_stale_sum / max(stream_stale_n, 1)
    results: list[StrategyResult] = []
    for ri, r in enumerate(runs):
        up, down, uploads = traffic[dev_index[ri]] if ri in dev_index else (r.fleet.bytes_up, r.fleet.bytes_down, r.fleet.uploads)
        results.append(
            _summarize(
                r.label,
                r.strategy.name,
                "strategy",
                r.strategy.describe(),
                r.log,
                config,
                dd,
                bytes_up=up,
                bytes_request=r.bytes_request,
                bytes_down=down,
                uploads=uploads,
                rejected={k: v for k, v in r.verifier.rejected.items() if v},
                latencies=np.asarray(r.latencies),
                staleness={
                    "stream_to_index_events": stream_stale,
                    "update_to_effect_events": float(np.mean(r.update_staleness)) if r.update_staleness else float("nan"),
                    "shown_list_age_min": float(np.mean(r.list_age_ms)) / 60_000 if r.list_age_ms else float("nan"),
                },
                rounds=r.rounds,
            )
        )
    for name, plog in base_logs.items():
        results.append(_summarize(name, name, "baseline", {"name": name, "description": _BASELINE_DESC[name]}, plog, config, dd))
    out = EvaluationResult(
        source=log.name,
        n_events=n,
        n_points=int(is_pos.sum()),
        n_users=int(len(np.unique(users))),
        n_items=int(len(np.unique(items))),
        device_days=dd,
        config={**dataclasses.asdict(config), **({"fleet_shards": fleet_shards} if fleet_shards else {}), "repeat_domain": repeat_domain, "cloud": type(cloud).__name__, "fusion_weights": _fusion_weights(cloud)},
        results=results,
        wall_s=wall,
        timings=timings,
        reference=reference,
    )
    logger.info("prequential replay done in %.1fs (%s)", wall, {k: round(v, 1) for k, v in timings.items()})
    return out


def _log_shown(w: Window, runs: Sequence[_Run], shown: Shown, rep_w: np.ndarray, relevant: Sequence[set[int] | None]) -> None:
    """Log what ``device_waves`` says each fleet showed, point by point in event order."""
    for fi, r in enumerate(runs):
        for o in np.flatnonzero(w.is_pos).tolist():
            j = int(w.idx[o])
            ranking, lat, ca = shown[fi, j]
            u, t = int(w.users[o]), int(w.ts[o])
            if lat is not None:
                r.latencies.append(lat)
            r.log.add(u, t, ranking, int(w.items[o]), bool(rep_w[o]), relevant[j])
            if ca is not None:
                r.list_age_ms.append(t - ca)


def _fusion_weights(cloud: CloudModel) -> dict[str, float]:
    """The ranking stage's linear weights per feature (what it learned the channels are worth)."""
    from cloud_recsys.fusion import FEATURES

    w = cloud.fusion.linear.weight.detach().numpy()[0]
    return {f: round(float(x), 4) for f, x in zip(FEATURES, w)}


def _summarize(
    label: str,
    name: str,
    kind: str,
    describe: dict[str, Any],
    plog: PredictionLog,
    config: EvalConfig,
    dd: int,
    bytes_up: int = 0,
    bytes_down: int = 0,
    bytes_request: int = 0,
    uploads: int = 0,
    rejected: dict[str, int] | None = None,
    latencies: np.ndarray | None = None,
    staleness: dict[str, float] | None = None,
    rounds: list[dict[str, Any]] | None = None,
) -> StrategyResult:
    pts = Points(plog.user, plog.ts_ms, plog.rank, plog.repeat, plog.recall)
    vals = per_point_values(pts.rank, pts.recall, config.ks)
    metrics = bootstrap_many(vals, pts.user, config.n_boot, seed=config.seed)
    rep = pts.repeat
    rep_m = bootstrap_many({k: v[rep] for k, v in vals.items()}, pts.user[rep], config.n_boot, seed=config.seed) if rep.any() else {}
    new_m = bootstrap_many({k: v[~rep] for k, v in vals.items()}, pts.user[~rep], config.n_boot, seed=config.seed) if (~rep).any() else {}
    ends, means = time_series(pts.ts_ms, ndcg_at_k(pts.rank, 10))
    lat = latencies if latencies is not None else np.zeros(0)
    sample = (lat * 1000.0)[:: max(1, len(lat) // 5000)].tolist() if len(lat) else []
    return StrategyResult(
        label=label,
        name=name,
        kind=kind,
        describe=describe,
        n_points=len(plog),
        metrics=metrics,
        repeat_metrics=rep_m,
        new_metrics=new_m,
        repeat_share=float(rep.mean()) if len(rep) else 0.0,
        bytes_up=int(bytes_up),
        bytes_down=int(bytes_down),
        bytes_up_per_device_day=bytes_up / max(dd, 1),
        bytes_down_per_device_day=bytes_down / max(dd, 1),
        bytes_request_per_device_day=bytes_request / max(dd, 1),
        uploads=int(uploads),
        rejected=rejected or {},
        latency=latency_summary(lat) if len(lat) else {},
        latency_samples_ms=sample,
        staleness=staleness or {},
        rounds=len(rounds or []),
        round_summaries=rounds or [],
        timeseries={"ts_ms": ends.tolist(), "NDCG@10": means.tolist()},
        points=pts,
    )


def _compare(results: list[StrategyResult], reference: str, config: EvalConfig) -> None:
    """Paired relative differences (bootstrap over users) of every result vs the reference."""
    ref = next((r for r in results if r.label == reference), None)
    if ref is None or ref.points is None:
        return
    rv = per_point_values(ref.points.rank, ref.points.recall, config.ks)
    for r in results:
        if r is ref or r.points is None or len(r.points.rank) != len(ref.points.rank):
            continue
        v = per_point_values(r.points.rank, r.points.recall, config.ks)
        for m in ("NDCG@10", "HR@10", "MRR"):
            r.vs_reference[m] = paired_relative_diff(v[m], rv[m], r.points.user, config.n_boot, seed=config.seed)


def metric_table_names(config: EvalConfig | None = None) -> list[str]:
    return metric_names((config or EvalConfig()).ks)
