"""``tandem evaluate [SOURCE]``: replay a log through every strategy, print the verdict and table, write the report."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from tandem.commands._errors import check_positive, check_writable_dir, did_you_mean, fail
from tandem.commands._load import (
    COLUMNS_HELP,
    EVENTS_HELP,
    LIMIT_HELP,
    SEP_HELP,
    TS_UNIT_HELP,
    check_limit,
    config_option,
    hidden_source_option,
    load_or_exit,
    source_argument,
    source_options,
)

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


#: Strategies whose device uploads change the lists (parameter and data updates), most first:
#: the default subject of the upload-policy sweep. Feature uploads only move the cloud's
#: interest vectors, so sweeping ``feature`` draws a flat frontier.
SWEEP_PREFERENCE: tuple[str, ...] = ("hybrid", "federated", "data", "feature")


def pick_sweep_strategy(spec: str, names: list[str]) -> str | None:
    """``auto`` -> the first of ``SWEEP_PREFERENCE`` among the selected strategies (None: nothing to sweep)."""
    if spec != "auto":
        return spec or None
    return next((n for n in SWEEP_PREFERENCE if n in names), None)


def strategy_names(spec: str) -> list[str]:
    """The names in ``--strategies`` (``all``: every registered one), checked with a did-you-mean."""
    from tandem.strategies import STRATEGIES

    names = list(STRATEGIES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        fail("--strategies is empty; use all or a comma list of: " + ", ".join(STRATEGIES))
    for n in names:
        if n not in STRATEGIES:
            fail(f"unknown strategy {n!r}{did_you_mean(n, STRATEGIES)}; known: {', '.join(STRATEGIES)} (or all)")
    return names


def import_plugins(modules: list[str]) -> None:
    """Import modules that ``register()`` their own strategies, so ``--strategies`` can name them."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            fail(f"--plugin {name}: cannot import ({exc})")


def render_table(result: Any, width: int = 120) -> str:
    """The terminal's compact table (plus the sweep table) as text of at most ``width`` columns."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    for t in _tables(result):
        console.print(t)
    return buf.getvalue()


def _tables(result: Any) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    from tandem.evaluation.report import terminal_rows, verdict

    win = verdict(result)
    beaten = {n for n, _ in win.beaten_by} if win else set()
    rows = terminal_rows(result)
    t = Table(
        title=f"{result.source}: {result.n_points:,} prediction points, wall {result.wall_s:.0f}s (full table in the report)",
        title_justify="left",
    )
    for c in rows[0]:
        t.add_column(c, justify="left" if c == "strategy" else "right", no_wrap=c != "strategy", overflow="fold")
    for row in rows:
        label = row["strategy"].removesuffix(" (baseline)")
        style = "bold green" if win and label == win.best else ("yellow" if label in beaten else ("dim" if row["strategy"].endswith("(baseline)") else ""))
        t.add_row(*(Text(v) for v in row.values()), style=style)  # Text: a label like feature[drift=0.2] is not markup
    out = [t]
    if result.frontier:
        fr = [
            {
                "policy": p["policy"],
                "upload/dev-day": f"{p['bytes_up_per_device_day']:.1f} B",
                "bytes vs always": f"{100 * p['bytes_ratio']:.1f}%",
                "NDCG@10 [95% CI]": f"{p['ndcg10']:.3f} [{p['ndcg10_lo']:.3f}, {p['ndcg10_hi']:.3f}]",
                "NDCG vs always": f"{100 * p['ndcg_ratio']:.1f}%",
                "uploads": str(p["uploads"]),
            }
            for p in result.frontier
        ]
        name = result.frontier[0]["label"].split("[", 1)[0]
        t2 = Table(title=f"upload policy sweep of {name} (bytes vs NDCG@10)", title_justify="left")
        for c in fr[0]:
            t2.add_column(c, justify="left" if c == "policy" else "right", no_wrap=True)
        for row in fr:
            t2.add_row(*(Text(v) for v in row.values()))
        out.append(t2)
    return out


def print_table(result: Any) -> None:
    """Verdict first, then the compact table; 120 columns when the output is not a terminal."""
    import os

    from rich.console import Console
    from rich.text import Text

    from tandem.evaluation.report import verdict

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)
    win = verdict(result)
    console.print(Text(win.line() if win else "Verdict: no strategy produced a score.", style="bold"), soft_wrap=True)
    for t in _tables(result):
        console.print(t)


def evaluate(
    source: str = source_argument(),
    source_opt: Optional[str] = hidden_source_option(),
    config_file: Optional[Path] = config_option(),
    strategies: str = typer.Option("all", "--strategies", help="all, or a comma list of strategy names (see --plugin)."),
    events: Optional[int] = typer.Option(None, "--events", help=EVENTS_HELP + " [default: 60000]"),
    limit: Optional[int] = typer.Option(None, "--limit", help=LIMIT_HELP),
    max_events: Optional[int] = typer.Option(None, "--max-events", hidden=True),
    path: Optional[Path] = typer.Option(None, "--path", hidden=True),
    sep: Optional[str] = typer.Option(None, "--sep", help=SEP_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    ts_unit: Optional[str] = typer.Option(None, "--ts-unit", help=TS_UNIT_HELP),
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Report folder (results.json, report.html, report.md, run.log)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic log, the models and the bootstrap."),
    refresh_every: int = typer.Option(1000, "--refresh-every", help="Events between cloud refreshes / aggregation rounds."),
    batch_size: int = typer.Option(256, "--batch-size", help="Cloud mini-batch (events)."),
    fetch_every_min: float = typer.Option(30.0, "--fetch-every-min", help="Re-fetch interval within a session (minutes)."),
    sweep: str = typer.Option("0.2,0.6,1.0", "--sweep", help="Drift thresholds of the upload-policy sweep ('' = no sweep)."),
    sweep_strategy: str = typer.Option(
        "auto", "--sweep-strategy", help="Strategy whose upload policy is swept (auto: the first of hybrid, federated, data, feature selected)."
    ),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap replicates for the intervals."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Replay processes (strategies split between them; same results as 1). [default: 2; 1 with --fleet-shards]"
    ),
    fleet_shards: int = typer.Option(
        0, "--fleet-shards", help="Split each strategy's simulated devices by user over this many Ray actors (0: in process; same results)."
    ),
    trust_radius: float = typer.Option(
        0.5, "--trust-radius", help="Max L2 drift of the shipped reranker from the fleet's starting one (<= 0: unbounded)."
    ),
    trial_devices: int = typer.Option(
        16, "--trial-devices", help="Ship gate of learned strategies: a changed reranker ships only when this many devices scored it no worse on fresh feedback (0: ship at once)."
    ),
    domain: str = typer.Option(
        "auto", "--domain", help="repeat (items are consumed again), feed (consumed items are never shown again) or auto."
    ),
    refetch_every: int = typer.Option(1, "--refetch-every", help="A device fetches again after this many engagements (0: only at session start and by time)."),
    save_model: Optional[Path] = typer.Option(
        None, "--save-model", help="Also save the trained cloud and each strategy's shared reranker in this folder (see docs/evaluation.md)."
    ),
    plugin: list[str] = typer.Option([], "--plugin", help="Python module to import first; its register()ed strategies become selectable (repeatable)."),
) -> None:
    """Replay a log through every strategy (test-then-train), print the verdict and the table, write the report.

    Every strategy runs on the production cloud recommender (two-tower, item-to-item, trending
    and repeat channels, ranked by a model trained on the stream), against simple baselines on
    the same prediction points. --workers splits strategies over processes, --fleet-shards one replay's
    devices over Ray actors (both: identical results).

    Examples: tandem evaluate synthetic --events 20000;  tandem evaluate clicks.tsv --columns user=SessionId,item=ItemId,ts=Time
    """
    # every check before any work: a mistake costs nothing
    source = source_opt or source
    limit = limit if limit is not None else max_events
    if domain not in ("auto", "feed", "repeat"):
        raise typer.BadParameter(f"{domain!r} is not one of auto, feed, repeat", param_hint="--domain")
    check_positive(refetch_every, "--refetch-every", allow_zero=True)
    check_positive(trial_devices, "--trial-devices", allow_zero=True)
    check_positive(batch_size, "--batch-size")
    check_positive(n_boot, "--n-boot")
    check_positive(workers, "--workers")
    check_positive(fleet_shards, "--fleet-shards", allow_zero=True)
    if fleet_shards > 0:
        if workers is not None and workers > 1:
            fail("--fleet-shards and --workers > 1 cannot be combined (the shards split one replay's devices); use --workers 1")
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            fail("--fleet-shards needs Ray, which is not installed (pip install ray==2.60.0)")
    workers = workers if workers is not None else (1 if fleet_shards > 0 else 2)
    check_positive(refresh_every, "--refresh-every")
    check_positive(fetch_every_min, "--fetch-every-min")
    if not math.isfinite(trust_radius):
        fail(f"--trust-radius must be a finite number, got {trust_radius}")
    check_limit(limit)
    try:
        thresholds = parse_thresholds(sweep)
    except ValueError:
        fail(f"--sweep must be a comma list of numbers, got {sweep!r}")
    import_plugins(plugin)
    names = strategy_names(strategies)
    swept = pick_sweep_strategy(sweep_strategy, names) if thresholds else None
    if swept is not None:
        from tandem.strategies import STRATEGIES

        if swept not in STRATEGIES:
            fail(f"unknown --sweep-strategy {swept!r}{did_you_mean(swept, STRATEGIES)}")
        if not STRATEGIES[swept].families:
            fail(f"--sweep-strategy {swept!r} sends nothing, so there is no upload policy to sweep")
    opts = source_options(source, events, seed, sep, columns, ts_unit)
    if path is not None:  # the old --path override of a named source's folder
        opts["path"] = path
    check_writable_dir(out)
    if save_model is not None:
        check_writable_dir(save_model, "--save-model")

    from rich.console import Console

    from tandem.evaluation.prequential import EvalConfig
    from tandem.evaluation.results import provenance

    err = Console(stderr=True)
    with run_log(out) as log_path:
        t0 = time.perf_counter()
        log = load_or_exit(source, err, **opts)
        err.print(f"loaded {source}: {len(log):,} events, {log.n_users:,} users, {log.n_items:,} items in {time.perf_counter() - t0:.1f}s", highlight=False)
        logger.info("loaded %s: %d events, %d users, %d items", source, len(log), log.n_users, log.n_items)
        strats = build_strategies(",".join(names), swept, thresholds)
        config = EvalConfig(
            refresh_every=refresh_every,
            batch_size=batch_size,
            fetch_every_ms=int(fetch_every_min * 60_000),
            n_boot=n_boot,
            max_events=limit,
            trust_radius=trust_radius if trust_radius > 0 else None,
            trial_min_devices=trial_devices,
            domain=domain,
            refetch_every=refetch_every,
            seed=seed,
        )
        result = _replay(log, strats, config, workers, err, source, save_model, fleet_shards)
        if thresholds and swept:
            result.frontier = frontier(result, swept)
        result.wall_s = time.perf_counter() - t0
        result.provenance = provenance(seed)
        print_table(result)
        from tandem.evaluation.report import verdict, write_report

        win = verdict(result)
        logger.info("%s", win.line() if win else "no verdict")
        paths = write_report(result, out)
        logger.info("report written to %s", paths["html"])
    Console().print(
        f"report: {paths['html']}  ({paths['markdown'].name}, results.json, {log_path.name}, plots) - total {result.wall_s:.0f}s", highlight=False, soft_wrap=True
    )
    if save_model is not None:
        Console().print(f"models: {save_model} (manifest.json; tandem.evaluation.saved.load_saved reads it)", highlight=False, soft_wrap=True)


def _replay(
    log: Any, strats: list[Any], config: Any, workers: int, console: Any, source: str, save_to: Path | None = None, fleet_shards: int = 0
) -> Any:
    """Run the replay under one progress bar that covers every worker.

    Each worker replays the same events for its share of the strategies; the bar counts
    events done summed over workers (events x workers in all), so it reaches 100% when the
    slowest worker ends.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tandem.evaluation.prequential import run_prequential
    from tandem.evaluation.protocol import replayed_events
    from tandem.evaluation.shards import ShardsUnavailable

    n_workers = min(workers, len(strats)) if workers > 1 and len(strats) > 1 else 1
    n = replayed_events(log, config)
    label = f"replay {source}" + (f" ({n_workers} workers)" if n_workers > 1 else "") + (f" ({fleet_shards} fleet shards)" if fleet_shards else "")
    unit = "events" if n_workers == 1 else f"events x{n_workers}"
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task(label, total=n * n_workers)

        def progress(i: int, total: int) -> None:
            bar.update(task, completed=i, total=total)

        try:
            result = run_prequential(log, strats, config, progress=progress, workers=workers, save_to=save_to, fleet_shards=fleet_shards)
        except ShardsUnavailable as exc:
            fail(str(exc))
        bar.update(task, description=f"replay {source}: done")
    return result


@contextmanager
def run_log(out: Path) -> Iterator[Path]:
    """Also log INFO and above to ``out/run.log`` for the run (the terminal stays at WARNING)."""
    path = out / "run.log"
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    for h in root.handlers:  # keep the terminal quiet while the root lets INFO through to the file
        if h.level == logging.NOTSET:
            h.setLevel(old_level if old_level != logging.NOTSET else logging.WARNING)
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level != logging.NOTSET else logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
