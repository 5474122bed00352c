"""Evaluation report: results.json, a Markdown report and a self-contained HTML page with plots.

The HTML embeds its PNG plots as base64 so it can be mailed or attached to a CI run as one
file; the same PNGs are also written beside it for the Markdown report.
Plots: NDCG@10 over time per strategy, the bytes-vs-NDCG@10 frontier (every strategy
plus the upload-policy sweep), and the on-device rerank latency histogram.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tandem.evaluation.results import EvaluationResult, StrategyResult

logger = logging.getLogger(__name__)

#: Columns of the main table (metric name, header).
TABLE_METRICS: tuple[str, ...] = ("NDCG@10", "HR@10", "Recall@10", "MRR", "NDCG@1", "NDCG@5", "NDCG@50", "HR@50")


def _fmt_ci(r: StrategyResult, m: str, which: str = "metrics") -> str:
    ci = getattr(r, which).get(m)
    if ci is None or not np.isfinite(ci.mean):
        return "-"
    return f"{ci.mean:.4f} [{ci.lo:.4f}, {ci.hi:.4f}]"


def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(x) < 1024 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024.0
    return f"{x:.1f} GB"


def _vs(r: StrategyResult, m: str = "NDCG@10") -> str:
    ci = r.vs_reference.get(m)
    if ci is None:
        return "ref" if r.kind == "strategy" and not r.vs_reference else "-"
    return f"{100 * ci.mean:+.1f}% [{100 * ci.lo:+.1f}, {100 * ci.hi:+.1f}]"


def table_rows(result: EvaluationResult) -> list[dict[str, str]]:
    """One dict per strategy/baseline with formatted cells (shared by Markdown, HTML and the CLI)."""
    rows = []
    for r in result.results:
        rows.append(
            {
                "strategy": r.label,
                "NDCG@10 [95% CI]": _fmt_ci(r, "NDCG@10"),
                f"vs {result.reference}": _vs(r) if r.label != result.reference else "ref",
                "HR@10": _fmt_ci(r, "HR@10"),
                "Recall@10": _fmt_ci(r, "Recall@10"),
                "MRR": _fmt_ci(r, "MRR"),
                "NDCG@10 repeat": _fmt_ci(r, "NDCG@10", "repeat_metrics"),
                "NDCG@10 new": _fmt_ci(r, "NDCG@10", "new_metrics"),
                "up/dev-day": _fmt_bytes(r.bytes_up_per_device_day),
                "down/dev-day": _fmt_bytes(r.bytes_down_per_device_day),
                "rerank p50/p99 ms": f"{r.latency['p50_ms']:.2f}/{r.latency['p99_ms']:.2f}" if r.latency else "-",
            }
        )
    return rows


def cutoff_rows(result: EvaluationResult) -> list[dict[str, str]]:
    """Every cut-off for every strategy (means only), for the appendix table."""
    out = []
    for r in result.results:
        row = {"strategy": r.label}
        for m in r.metrics:
            row[m] = f"{r.metrics[m].mean:.4f}"
        out.append(row)
    return out


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row.get(c, "") for c in cols) + " |" for row in rows]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------
def _plots(result: EvaluationResult) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        pngs[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for r in result.results:
        ts = np.asarray(r.timeseries.get("ts_ms", []), dtype=np.float64)
        ys = r.timeseries.get("NDCG@10", [])
        if len(ts):
            days = (ts - ts.min()) / 86_400_000 if len(ts) else ts
            ax.plot(days, ys, marker=".", label=r.label, linestyle="--" if r.kind == "baseline" else "-")
    ax.set_xlabel("days since first prediction (end of equal-count bin)")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{result.source}: NDCG@10 over time (prequential)")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "ndcg_over_time.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in result.results:
        if r.kind != "strategy":
            continue
        m = r.metrics["NDCG@10"]
        ax.errorbar(r.bytes_up_per_device_day, m.mean, yerr=[[m.mean - m.lo], [m.hi - m.mean]], fmt="o", capsize=3, label=r.label)
    if result.frontier:
        fx = [p["bytes_up_per_device_day"] for p in result.frontier]
        fy = [p["ndcg10"] for p in result.frontier]
        order = np.argsort(fx)
        ax.plot(np.asarray(fx)[order], np.asarray(fy)[order], "k:", alpha=0.6, label="policy sweep")
        for p in result.frontier:
            ax.annotate(p["policy"], (p["bytes_up_per_device_day"], p["ndcg10"]), fontsize=6)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("upload bytes per device-day (symlog)")
    ax.set_ylabel("NDCG@10 (95% CI)")
    ax.set_title("traffic vs accuracy")
    ax.legend(fontsize=7)
    save(fig, "bytes_vs_ndcg.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result.results:
        if r.kind == "strategy" and r.describe.get("rerank") and r.latency_samples_ms:
            ax.hist(np.asarray(r.latency_samples_ms), bins=60, histtype="step", label=r.label)
    ax.set_xlabel("on-device ranking latency (ms, simulated device = this CPU)")
    ax.set_ylabel("rankings")
    ax.set_yscale("log")
    ax.set_title("device rerank latency")
    ax.legend(fontsize=7)
    save(fig, "latency_hist.png")
    return pngs


# -- writers ---------------------------------------------------------------------------
def render_markdown(result: EvaluationResult, plot_names: list[str]) -> str:
    c = result.config
    lines = [
        f"# Tandem evaluation: {result.source}",
        "",
        f"{result.n_events:,} events, {result.n_points:,} prediction points, {result.n_users:,} users, "
        f"{result.n_items:,} items, {result.device_days:,} active device-days; wall {result.wall_s:.0f} s.",
        "",
        f"Protocol: prequential test-then-train; cloud mini-batch {c.get('batch_size')} events, refresh + aggregation "
        f"every {c.get('refresh_every')} events, fetch at session start, every {int(c.get('fetch_every_ms', 0)) // 60000} min and after every "
        f"{c.get('refetch_every')} engagement(s), each carrying the device's recent items; "
        f"k={c.get('k')} candidates, repeat domain={c.get('repeat_domain')}, cloud model={c.get('cloud')}. "
        "95% intervals: bootstrap over users; 'vs' = paired relative difference to the reference.",
        "",
        "## Strategies",
        "",
        markdown_table(table_rows(result)),
        "",
    ]
    if result.frontier:
        lines += ["## Upload policy sweep (bytes vs NDCG@10)", "", markdown_table(_frontier_rows(result)), ""]
    lines += ["## All cut-offs", "", markdown_table(cutoff_rows(result)), ""]
    lines += ["## Staleness and traffic", "", markdown_table(_ops_rows(result)), ""]
    lines += ["## Timing", "", markdown_table(timing_rows(result)), ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += ["## Plots", ""] + [f"![{n}]({n})" for n in plot_names] + [""]
    return "\n".join(lines)


def _frontier_rows(result: EvaluationResult) -> list[dict[str, str]]:
    return [
        {
            "variant": p["label"],
            "policy": p["policy"],
            "upload B/dev-day": f"{p['bytes_up_per_device_day']:.1f}",
            "bytes vs always": f"{100 * p['bytes_ratio']:.1f}%",
            "NDCG@10": f"{p['ndcg10']:.4f} [{p['ndcg10_lo']:.4f}, {p['ndcg10_hi']:.4f}]",
            "NDCG vs always": f"{100 * p['ndcg_ratio']:.1f}%",
            "uploads": str(p["uploads"]),
        }
        for p in result.frontier
    ]


def timing_rows(result: EvaluationResult) -> list[dict[str, str]]:
    """Where the replay's wall time went (the loop's own breakdown) plus the command's total."""
    rows = [{"part": k.removesuffix("_s"), "seconds": f"{v:.1f}"} for k, v in result.timings.items()]
    rows.append({"part": "total (command wall)", "seconds": f"{result.wall_s:.1f}"})
    return rows


def _ops_rows(result: EvaluationResult) -> list[dict[str, str]]:
    out = []
    for r in result.results:
        if r.kind != "strategy":
            continue
        st = r.staleness
        out.append(
            {
                "strategy": r.label,
                "uploads": str(r.uploads),
                "bytes up": _fmt_bytes(r.bytes_up),
                "bytes down": _fmt_bytes(r.bytes_down),
                "rejected": ", ".join(f"{k}={v}" for k, v in r.rejected.items()) or "0",
                "stream->index (events)": f"{st.get('stream_to_index_events', float('nan')):.0f}",
                "update->effect (events)": f"{st.get('update_to_effect_events', float('nan')):.0f}",
                "shown list age (min)": f"{st.get('shown_list_age_min', float('nan')):.1f}",
                "rounds": str(r.rounds),
            }
        )
    return out


def render_html(result: EvaluationResult, pngs: dict[str, bytes]) -> str:
    def table(rows: list[dict[str, str]]) -> str:
        if not rows:
            return ""
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in cols) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(b).decode()}"/><figcaption>{html.escape(n)}</figcaption></figure>'
        for n, b in pngs.items()
    )
    md_intro = render_markdown(result, []).split("## Strategies")[0].replace("# ", "", 1)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Tandem evaluation: "
        + html.escape(result.source)
        + "</title><style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "figure{display:inline-block;margin:1em}</style></head><body>",
        f"<h1>Tandem evaluation: {html.escape(result.source)}</h1>",
        "<p>" + html.escape(md_intro.split("\n", 1)[1].strip()).replace("\n\n", "</p><p>") + "</p>",
        "<h2>Strategies</h2>",
        table(table_rows(result)),
    ]
    if result.frontier:
        parts += ["<h2>Upload policy sweep</h2>", table(_frontier_rows(result))]
    parts += ["<h2>All cut-offs</h2>", table(cutoff_rows(result)), "<h2>Staleness and traffic</h2>", table(_ops_rows(result))]
    parts += ["<h2>Timing</h2>", table(timing_rows(result))]
    if result.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in result.notes] + ["</ul>"]
    parts += ["<h2>Plots</h2>", imgs, "</body></html>"]
    return "".join(parts)


def write_report(result: EvaluationResult, out_dir: Path | str) -> dict[str, Path]:
    """Write results.json, report.md, report.html and the PNGs into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"json": result.write_json(out / "results.json")}
    pngs = _plots(result)
    for name, data in pngs.items():
        (out / name).write_bytes(data)
        paths[name] = out / name
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(render_markdown(result, list(pngs)))
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(result, pngs))
    logger.info("report written to %s", out)
    return paths
