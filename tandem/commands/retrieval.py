"""``tandem retrieval [SOURCE]``: offline retrieval quality of the cloud two-tower.

Temporal split (train on the first 80% of time, test on the rest); prints Recall@50,
Recall@100 and NDCG@10 of the two-tower through the FAISS index (ANN), exact search
over the same embeddings, and popularity baselines (cloud_recsys/retrieval_eval.py).

Examples::

    tandem retrieval movielens
    tandem retrieval synthetic --events 50000 --epochs 5 --json runs/retrieval.json
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from tandem.commands._errors import check_positive, fail
from tandem.commands._load import (
    COLUMNS_HELP,
    EVENTS_HELP,
    LIMIT_HELP,
    SEP_HELP,
    TS_UNIT_HELP,
    check_limit,
    config_option,
    hidden_source_option,
    source_argument,
    source_options,
)

log = logging.getLogger(__name__)


def retrieval_command(
    source: str = source_argument("movielens"),
    source_opt: Optional[str] = hidden_source_option(),
    config_file: Optional[Path] = config_option(),
    train_fraction: float = typer.Option(0.8, "--train-fraction", help="share of the log (by time) used for training"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="warm-start passes (default: the tuned config's)"),
    dim: Optional[int] = typer.Option(None, "--dim", help="embedding and tower output width"),
    history_len: Optional[int] = typer.Option(None, "--history-len", help="recent items in the user's history bag"),
    popularity_prior: Optional[float] = typer.Option(None, "--popularity-prior", help="beta of the log-popularity prior (0: off)"),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", help="two-towers (seeds seed..seed+N-1) whose scores are averaged"),
    index_kind: str = typer.Option("ivf", "--index", help="FAISS index for the ANN row: ivf | hnsw | flat"),
    nprobe: int = typer.Option(32, "--nprobe", help="IVF cells probed per query"),
    include_seen: bool = typer.Option(False, "--include-seen", help="do not exclude items the user engaged with in training"),
    events: Optional[int] = typer.Option(None, "--events", help=EVENTS_HELP + " [default: 60000]"),
    limit: Optional[int] = typer.Option(None, "--limit", help=LIMIT_HELP),
    sep: Optional[str] = typer.Option(None, "--sep", help=SEP_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    ts_unit: Optional[str] = typer.Option(None, "--ts-unit", help=TS_UNIT_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows as JSON here"),
    seed: int = typer.Option(0, "--seed", help="model seed"),
    threads: int = typer.Option(1, "--threads", help="torch/faiss threads (small towers: 1 is fastest, no OpenMP spinning)"),
) -> None:
    """Evaluate two-tower retrieval (FAISS and exact) against popularity on a temporal split."""
    source = source_opt or source
    check_positive(threads, "--threads")
    check_positive(ensemble, "--ensemble")
    check_positive(epochs, "--epochs")
    check_positive(dim, "--dim")
    check_positive(nprobe, "--nprobe")
    check_limit(limit)
    if not 0.0 < train_fraction < 1.0:
        fail(f"--train-fraction must be between 0 and 1, got {train_fraction}")
    if index_kind not in ("ivf", "hnsw", "flat"):
        fail(f"--index must be ivf, hnsw or flat, got {index_kind!r}")
    opts = source_options(source, events, seed, sep, columns, ts_unit)
    if source == "synthetic":
        opts.pop("seed", None)  # --seed is the model's seed here; the synthetic log keeps its default
    import torch

    torch.set_num_threads(threads)
    from rich.console import Console
    from rich.table import Table

    from cloud_recsys.index import IndexConfig
    from cloud_recsys.retrieval_eval import TUNED, evaluate
    from tandem.commands._load import load_or_exit

    console = Console(stderr=True)
    t_start = time.perf_counter()
    event_log = load_or_exit(source, console, **opts)
    if limit is not None and limit < len(event_log):
        event_log = event_log.rows(0, limit)
    cfg = TUNED
    model = replace(cfg.model, seed=seed)
    if dim is not None:
        model = replace(model, embedding_dim=dim, out_dim=dim)
    if history_len is not None:
        model = replace(model, history_len=history_len)
    cfg = replace(
        cfg,
        train_fraction=train_fraction,
        epochs=epochs if epochs is not None else cfg.epochs,
        exclude_seen=not include_seen,
        popularity_prior=popularity_prior if popularity_prior is not None else cfg.popularity_prior,
        ensemble=ensemble if ensemble is not None else cfg.ensemble,
        model=model,
        index=IndexConfig(kind=index_kind, nprobe=nprobe, threads=threads),
    )
    console.print(f"{event_log.name}: {len(event_log):,} events, {event_log.n_users:,} users, {event_log.n_items:,} items")
    try:
        rows = evaluate(event_log, cfg, progress=True)
    except ValueError as exc:
        console.print(f"[red]cannot evaluate:[/red] {exc}")
        raise typer.Exit(2) from None
    info = rows["_info"]
    total_s = time.perf_counter() - t_start
    table = Table(title=f"retrieval on {event_log.name}: temporal split {train_fraction:.0%} / {1 - train_fraction:.0%}")
    table.add_column("method")
    metrics = list(rows["popularity"])
    for m in metrics:
        table.add_column(m, justify="right")
    for method, vals in rows.items():
        if not method.startswith("_"):
            table.add_row(method, *(f"{vals[m]:.4f}" for m in metrics))
    out = Console()
    out.print(table)
    out.print(
        f"train {int(info['train_events']):,} positives, test {int(info['test_events']):,} positives, "
        f"{int(info['test_users']):,} test users, {int(info['items']):,} items; epochs {cfg.epochs}, "
        f"dim {cfg.model.out_dim}, history {cfg.model.history_len}, popularity prior {cfg.popularity_prior}, ensemble {cfg.ensemble}; "
        f"fit {info['fit_seconds']:.1f} s, total {total_s:.1f} s"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**rows, "_info": {**info, "total_seconds": total_s}}, indent=2))


def register(app: typer.Typer) -> None:
    """Add ``tandem retrieval`` to the CLI."""
    app.command("retrieval")(retrieval_command)
