"""Replay a strategy set in several processes: strategies split by cost, each process
trains its own copy of the (deterministic) cloud and replays its group on the same events.

Progress: every worker writes its events done into a shared array, and the parent reports
their sum (``progress(done, events x workers)``) while it waits, so one bar covers all of them
and ends at 100% only when the slowest worker does."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from streams.datasets.base import EventLog
from tandem.evaluation.protocol import CloudFactory, EvalConfig, replayed_events
from tandem.evaluation.results import EvaluationResult
from tandem.strategies.base import Strategy


#: Relative replay cost of a strategy's devices (measured on the first 10k Twitch events with a
#: fetch per engagement; used only to balance workers). The first worker also runs the baselines.
_COST = {"cloud-only": 0.05, "device-rerank": 0.75, "feature": 0.85, "federated": 1.2, "data": 1.0, "hybrid": 1.7}
_BASELINES_COST = 0.3


def split_by_cost(strategies: Sequence[Strategy], workers: int) -> list[list[int]]:
    """Partition strategy indices into ``workers`` groups of similar cost (group 0 also replays
    the baselines): exhaustive for two workers and a handful of strategies, else greedy longest-first."""
    cost = [_COST.get(s.name, 1.0) for s in strategies]
    n = len(strategies)
    if workers == 2 and 1 < n <= 14:
        best: tuple[float, int] | None = None
        for mask in range(1, 2 ** (n - 1)):  # strategy n-1 always in group 0 (symmetry)
            b = sum(c for i, c in enumerate(cost) if mask >> i & 1)
            a = sum(cost) - b + _BASELINES_COST
            if best is None or max(a, b) < best[0]:
                best = (max(a, b), mask)
        assert best is not None
        g1 = [i for i in range(n) if best[1] >> i & 1]
        return [[i for i in range(n) if not best[1] >> i & 1], g1]
    order = sorted(range(len(strategies)), key=lambda i: -_COST.get(strategies[i].name, 1.0))
    groups: list[list[int]] = [[] for _ in range(min(workers, len(strategies)))]
    load = [0.0] * len(groups)
    for i in order:
        g = int(np.argmin(load))
        groups[g].append(i)
        load[g] += _COST.get(strategies[i].name, 1.0)
    return [sorted(g) for g in groups if g]


def run_parallel(
    log: EventLog,
    strategies: Sequence[Strategy],
    config: EvalConfig,
    cloud_factory: CloudFactory | None,
    progress: Callable[[int, int], None] | None,
    reference: str,
    workers: int,
    save_to: Path | str | None = None,
) -> EvaluationResult:
    """``run_prequential`` over ``workers`` forked processes (its arguments); with ``save_to``
    each worker saves its own strategies there, and the first one the cloud."""
    import multiprocessing as mp

    from tandem.evaluation.prequential import _compare, _run  # the driver imports this module

    t0 = time.perf_counter()
    groups = split_by_cost(strategies, workers)
    ctx = mp.get_context("fork")  # strategies hold lambdas (policy factories): inherit, do not pickle

    done = ctx.Array("q", len(groups), lock=False)  # events replayed per worker (each writes its own slot)

    def work(g: int, idx: list[int], conn: Any) -> None:
        def report(i: int, _total: int) -> None:
            done[g] = i

        try:
            torch.set_num_threads(1)
            res = _run(
                log, [strategies[i] for i in idx], config, cloud_factory, report, reference, baselines=g == 0, save_to=save_to, save_cloud=g == 0
            )
            conn.send_bytes(pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException as exc:  # report, do not hang the parent
            conn.send_bytes(pickle.dumps(exc))
        finally:
            conn.close()

    procs, pipes = [], []
    for g, idx in enumerate(groups):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=work, args=(g, idx, send), daemon=True)
        p.start()
        send.close()
        procs.append(p)
        pipes.append(recv)
    objs = _gather(pipes, done, replayed_events(log, config) * len(groups), progress)
    parts: list[EvaluationResult] = []
    for p, obj in zip(procs, objs):
        p.join()
        if isinstance(obj, BaseException):
            raise RuntimeError("a replay worker failed") from obj
        parts.append(obj)
    by_label = {r.label: r for part in parts for r in part.results}
    results = [by_label[s.label] for s in strategies] + [r for r in parts[0].results if r.kind == "baseline"]
    _compare(results, reference, config)
    head = parts[0]
    timings = {k: float(head.timings.get(k, 0.0)) for k in ("cloud_train_s", "retrieval_s", "baselines_s")}
    timings["devices_s"] = float(sum(p.timings.get("devices_s", 0.0) for p in parts))
    timings["rounds_s"] = float(sum(p.timings.get("rounds_s", 0.0) for p in parts))
    timings["worker_replay_max_s"] = float(max(p.timings.get("replay_total_s", 0.0) for p in parts))
    timings["replay_total_s"] = time.perf_counter() - t0
    head.results = results
    head.timings = timings
    head.wall_s = timings["replay_total_s"]
    head.config = {**head.config, "workers": len(groups)}
    return head


def _gather(pipes: list[Any], done: Any, total: int, progress: Callable[[int, int], None] | None, poll_s: float = 0.2) -> list[Any]:
    """Each worker's unpickled answer (in worker order), reporting the summed progress meanwhile.

    Why poll: the parent is otherwise idle while the workers replay; it is the one place that
    sees every worker, so it drives the one progress bar.
    """
    objs: list[Any] = [None] * len(pipes)
    waiting = set(range(len(pipes)))
    last = -1
    while waiting:
        for g in sorted(waiting):
            if pipes[g].poll(poll_s / len(pipes)):
                try:
                    objs[g] = pickle.loads(pipes[g].recv_bytes())
                except EOFError:  # the worker died without answering (killed, out of memory)
                    objs[g] = RuntimeError(f"replay worker {g + 1} exited without a result")
                waiting.discard(g)
        now = int(sum(done))
        if progress is not None and now != last:
            progress(now, total)
            last = now
    return objs
