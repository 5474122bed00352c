"""``tandem evaluate``: replay a log through every strategy, print the table, write the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import typer

logger = logging.getLogger(__name__)


def parse_thresholds(text: str) -> list[float]:
    """"0.05,0.1" -> [0.05, 0.1] (empty string -> no sweep)."""
    return [float(x) for x in text.split(",") if x.strip()]


def build_strategies(spec: str, sweep_strategy: str | None, thresholds: list[float]) -> list[Any]:
    """The strategies to run, plus DriftTriggered variants of ``sweep_strategy`` for the traffic frontier.

    The always-upload variant is the strategy itself; each threshold adds a copy labelled
    ``name[drift=th]``. All run in the same replay, on the same events and cloud.
    """
    from device_rerank.policy import DriftTriggered
    from tandem.strategies import STRATEGIES, make_strategies

    strategies = make_strategies(spec)
    if sweep_strategy and thresholds:
        if sweep_strategy not in STRATEGIES:
            raise KeyError(f"unknown sweep strategy {sweep_strategy!r}")
        if STRATEGIES[sweep_strategy].families == ():
            raise ValueError(f"{sweep_strategy!r} sends nothing; nothing to sweep")
        if not any(s.label == sweep_strategy for s in strategies):
            strategies.append(STRATEGIES[sweep_strategy]())
        for th in thresholds:
            strategies.append(STRATEGIES[sweep_strategy](policy_factory=lambda th=th: DriftTriggered(th), label=f"{sweep_strategy}[drift={th:g}]"))
    return strategies


def frontier(result: Any, name: str) -> list[dict[str, Any]]:
    """Bytes-vs-NDCG@10 points of every variant of strategy ``name`` (always-upload first)."""
    variants = [r for r in result.results if r.kind == "strategy" and r.name == name]
    base = next((r for r in variants if r.label == name), None)
    if base is None:
        return []
    out = []
    for r in variants:
        m = r.metrics["NDCG@10"]
        out.append(
            {
                "label": r.label,
                "policy": "always" if r.label == name else r.label.split("[", 1)[1].rstrip("]"),
                "bytes_up": r.bytes_up,
                "bytes_up_per_device_day": r.bytes_up_per_device_day,
                "bytes_ratio": r.bytes_up / base.bytes_up if base.bytes_up else float("nan"),
                "ndcg10": m.mean,
                "ndcg10_lo": m.lo,
                "ndcg10_hi": m.hi,
                "ndcg_ratio": m.mean / base.metrics["NDCG@10"].mean if base.metrics["NDCG@10"].mean else float("nan"),
                "uploads": r.uploads,
            }
        )
    return out


def print_table(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from tandem.report import _frontier_rows, table_rows

    console = Console(width=220)
    rows = table_rows(result)
    t = Table(title=f"{result.source}: {result.n_points:,} prediction points, wall {result.wall_s:.0f}s")
    for c in rows[0]:
        t.add_column(c, justify="left" if c == "strategy" else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row.values())
    console.print(t)
    if result.frontier:
        fr = _frontier_rows(result)
        t2 = Table(title="upload policy sweep (bytes vs NDCG@10)")
        for c in fr[0]:
            t2.add_column(c, justify="right", no_wrap=True)
        for row in fr:
            t2.add_row(*row.values())
        console.print(t2)


def evaluate(
    source: str = typer.Option("synthetic", "--source", help="synthetic | movielens | twitch | PATH"),
    path: Optional[Path] = typer.Option(None, "--path", help="Override the data location for movielens/twitch."),
    strategies: str = typer.Option("all", "--strategies", help="all, or a comma list of strategy names."),
    events: int = typer.Option(60_000, "--events", help="Events to generate (synthetic only)."),
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Report folder."),
    seed: int = typer.Option(0, "--seed"),
    max_events: Optional[int] = typer.Option(None, "--max-events", help="Replay only the first N events."),
    refresh_every: int = typer.Option(1000, "--refresh-every", help="Events between cloud refreshes / aggregation rounds."),
    batch_size: int = typer.Option(256, "--batch-size", help="Cloud mini-batch (events)."),
    fetch_every_min: float = typer.Option(30.0, "--fetch-every-min", help="Re-fetch interval within a session."),
    sweep: str = typer.Option("0.2,0.6,1.0", "--sweep", help="DriftTriggered thresholds for the traffic frontier ('' = none)."),
    sweep_strategy: str = typer.Option("feature", "--sweep-strategy", help="Strategy whose upload policy is swept."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap replicates for the intervals."),
    workers: int = typer.Option(2, "--workers", help="Replay processes (strategies split between them; same results as 1)."),
    trust_radius: float = typer.Option(
        0.5, "--trust-radius", help="Max L2 drift of the shipped reranker from the fleet's starting one (<= 0: unbounded)."
    ),
    domain: str = typer.Option(
        "auto", "--domain", help="repeat (items are consumed again), feed (consumed items are never shown again) or auto."
    ),
    refetch_every: int = typer.Option(1, "--refetch-every", help="A device fetches again after this many engagements (0: only at session start and by time)."),
) -> None:
    """Replay a log through every strategy (prequential), print the table and write the report.

    Every strategy runs on the production cloud (cloud_recsys.recommender: two-tower,
    item-to-item, trending and repeat channels, ranked by a model trained on the stream),
    against the simple baselines on the same points. ``--workers`` splits strategies over
    forked processes (identical results).
    """
    if domain not in ("auto", "feed", "repeat"):
        raise typer.BadParameter(f"{domain!r} is not one of auto, feed, repeat", param_hint="--domain")
    if refetch_every < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--refetch-every")
    from tqdm import tqdm

    from streams.datasets import load_source
    from tandem.evaluation.prequential import EvalConfig, run_prequential
    from tandem.report import write_report

    t0 = time.perf_counter()
    opts: dict[str, Any] = {}
    if source == "synthetic":
        opts = {"events": events, "seed": seed}
    elif path is not None:
        opts = {"path": path}
    log = load_source(source, **opts)
    typer.echo(f"loaded {source}: {len(log):,} events, {log.n_users:,} users, {log.n_items:,} items in {time.perf_counter() - t0:.1f}s")
    thresholds = parse_thresholds(sweep)
    strats = build_strategies(strategies, sweep_strategy if thresholds else None, thresholds)
    config = EvalConfig(
        refresh_every=refresh_every,
        batch_size=batch_size,
        fetch_every_ms=int(fetch_every_min * 60_000),
        n_boot=n_boot,
        max_events=max_events,
        trust_radius=trust_radius if trust_radius > 0 else None,
        domain=domain,
        refetch_every=refetch_every,
        seed=seed,
    )
    bar = tqdm(total=len(log) if max_events is None else min(len(log), max_events), unit="ev", desc=f"replay {source}", smoothing=0.05)
    done = [0]

    def progress(i: int, n: int) -> None:
        bar.total = n
        bar.update(i - done[0])
        done[0] = i

    result = run_prequential(log, strats, config, progress=progress, workers=workers)
    bar.close()
    if thresholds:
        result.frontier = frontier(result, sweep_strategy)
    result.wall_s = time.perf_counter() - t0
    print_table(result)
    paths = write_report(result, out)
    typer.echo(f"report: {paths['html']}  ({paths['markdown'].name}, results.json, plots) - total {result.wall_s:.0f}s")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
