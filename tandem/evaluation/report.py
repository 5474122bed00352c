"""Evaluation report: results.json, a Markdown report and a self-contained HTML page with plots.

The HTML embeds its PNG plots as base64 so it can be mailed or attached to a CI run as one
file; the same PNGs are also written beside it for the Markdown report.
The verdict (``verdict``) comes first everywhere: the best collaboration strategy, its
paired delta to the reference with its interval, its upload bytes per device-day, and every
simple baseline that beats it, named. Tables are sorted by NDCG@10 with the winner
highlighted. Plots: NDCG@10 over time per strategy (distinct colours, labelled at the line
ends), the bytes-vs-NDCG@10 frontier (every strategy plus the upload-policy sweep, labelled
in place), and on-device rerank latency as p50/p99 bars.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.evaluation.bootstrap import CI
from tandem.evaluation.results import EvaluationResult, StrategyResult

logger = logging.getLogger(__name__)

#: Columns of the main table (metric name, header).
TABLE_METRICS: tuple[str, ...] = ("NDCG@10", "HR@10", "Recall@10", "MRR", "NDCG@1", "NDCG@5", "NDCG@50", "HR@50")


def _fmt_ci(r: StrategyResult, m: str, which: str = "metrics") -> str:
    ci = getattr(r, which).get(m)
    if ci is None or not np.isfinite(ci.mean):
        return "-"
    return f"{ci.mean:.4f} [{ci.lo:.4f}, {ci.hi:.4f}]"


def _num(x: float | None, fmt: str) -> str:
    """A number, or "-" when it is missing or not finite (never "nan" in a report)."""
    return fmt.format(x) if x is not None and np.isfinite(x) else "-"


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


# -- verdict ---------------------------------------------------------------------------
@dataclass
class Verdict:
    """Who wins a run, in one line (terminal first line, top of the report).

    Args:
        best: label of the best collaboration strategy by mean ``metric`` (ties: fewer upload bytes).
        reference: the reference strategy the delta is paired against.
        metric: the ranking metric (NDCG@10).
        score: ``best``'s metric with its interval.
        delta: paired relative difference to the reference (None when ``best`` is the reference).
        bytes_up_per_device_day: what ``best`` uploads per active device-day.
        beaten_by: baselines whose mean ``metric`` is above ``best``'s, best first, with their means.
    """

    best: str
    reference: str
    metric: str
    score: CI
    delta: CI | None
    bytes_up_per_device_day: float
    beaten_by: list[tuple[str, float]] = field(default_factory=list)

    def line(self) -> str:
        """The verdict as one plain-text sentence (no markup)."""
        head = f"Verdict: {self.best} is the best strategy, {self.metric} {self.score.mean:.4f}"
        if self.delta is None:
            rel = f" (it is the reference, {self.reference})"
        else:
            rel = (
                f", {100 * self.delta.mean:+.1f}% [{100 * self.delta.lo:+.1f}, {100 * self.delta.hi:+.1f}] vs {self.reference}"
                + (" (interval excludes 0)" if self.delta.lo > 0 or self.delta.hi < 0 else " (interval includes 0)")
            )
        cost = f", {_fmt_bytes(self.bytes_up_per_device_day)} uploaded per device-day"
        if self.beaten_by:
            tail = "; beaten by baseline(s) " + ", ".join(f"{name} ({mean:.4f})" for name, mean in self.beaten_by) + "."
        else:
            tail = "; no baseline beats it."
        return head + rel + cost + tail


def verdict(result: EvaluationResult, metric: str = "NDCG@10") -> Verdict | None:
    """The run's verdict, or None when no strategy has a finite ``metric``."""
    strategies = [r for r in result.results if r.kind == "strategy" and metric in r.metrics and np.isfinite(r.metrics[metric].mean)]
    if not strategies:
        return None
    best = min(strategies, key=lambda r: (-r.metrics[metric].mean, r.bytes_up_per_device_day, r.label))
    score = best.metrics[metric]
    beaten = sorted(
        (
            (r.label, float(r.metrics[metric].mean))
            for r in result.results
            if r.kind == "baseline" and metric in r.metrics and np.isfinite(r.metrics[metric].mean) and r.metrics[metric].mean > score.mean
        ),
        key=lambda x: -x[1],
    )
    delta = None if best.label == result.reference else best.vs_reference.get(metric)
    return Verdict(best.label, result.reference, metric, score, delta, best.bytes_up_per_device_day, beaten)


def sorted_results(result: EvaluationResult, metric: str = "NDCG@10") -> list[StrategyResult]:
    """Strategies and baselines, best mean ``metric`` first (NaN last)."""

    def key(r: StrategyResult) -> tuple[float, str]:
        m = r.metrics.get(metric)
        return (-(m.mean if m is not None and np.isfinite(m.mean) else -np.inf), r.label)

    return sorted(result.results, key=key)


def table_rows(result: EvaluationResult) -> list[dict[str, str]]:
    """One dict per strategy/baseline with formatted cells, best NDCG@10 first (Markdown and HTML)."""
    rows = []
    for r in sorted_results(result):
        rows.append(
            {
                "strategy": r.label,
                "kind": r.kind,
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


def terminal_rows(result: EvaluationResult) -> list[dict[str, str]]:
    """The compact table for a 120-column terminal: means with short intervals, best first.

    The full table (every metric and interval) is in the report.
    """
    rows = []
    for r in sorted_results(result):
        m = r.metrics.get("NDCG@10")
        nd = f"{m.mean:.3f} [{m.lo:.3f}, {m.hi:.3f}]" if m is not None and np.isfinite(m.mean) else "-"
        hr = r.metrics.get("HR@10")
        mrr = r.metrics.get("MRR")
        rows.append(
            {
                "strategy": r.label + (" (baseline)" if r.kind == "baseline" else ""),
                "NDCG@10 [95% CI]": nd,
                f"vs {result.reference}": _vs(r) if r.label != result.reference else "ref",
                "HR@10": f"{hr.mean:.3f}" if hr is not None and np.isfinite(hr.mean) else "-",
                "MRR": f"{mrr.mean:.3f}" if mrr is not None and np.isfinite(mrr.mean) else "-",
                "up/dev-day": _fmt_bytes(r.bytes_up_per_device_day),
                "p50/p99 ms": f"{r.latency['p50_ms']:.1f}/{r.latency['p99_ms']:.1f}" if r.latency else "-",
            }
        )
    return rows


def cutoff_rows(result: EvaluationResult) -> list[dict[str, str]]:
    """Every cut-off for every strategy (means only), for the appendix table."""
    out = []
    for r in sorted_results(result):
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
def _colours(n: int) -> list[Any]:
    """``n`` distinct colours (tab10, then tab20's light shades): no two series share one."""
    import matplotlib

    base = list(matplotlib.colormaps["tab10"].colors)
    extra = [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i % 2 == 1]
    more = list(matplotlib.colormaps["Dark2"].colors)
    pool = base + extra + more
    return [pool[i % len(pool)] for i in range(n)]


def _spread(ys: list[float], gap: float) -> list[float]:
    """Label positions near ``ys`` but at least ``gap`` apart (direct labels that do not overlap)."""
    order = np.argsort(ys)
    out = np.asarray(ys, dtype=np.float64).copy()
    last = -np.inf
    for i in order:
        out[i] = max(out[i], last + gap)
        last = out[i]
    return out.tolist()


def _plots(result: EvaluationResult) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    win = verdict(result)
    best = win.best if win else None

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        pngs[name] = buf.getvalue()

    ordered = sorted_results(result)
    colour = dict(zip([r.label for r in ordered], _colours(len(ordered))))

    # NDCG@10 over time: one colour per series, labelled at its last point (no legend to decode)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ends: list[tuple[str, float, float]] = []
    for r in ordered:
        ts = np.asarray(r.timeseries.get("ts_ms", []), dtype=np.float64)
        ys = r.timeseries.get("NDCG@10", [])
        if len(ts) and len(ys):
            days = (ts - ts.min()) / 86_400_000
            ax.plot(
                days, ys, marker=".", color=colour[r.label], linestyle="--" if r.kind == "baseline" else "-",
                linewidth=2.6 if r.label == best else 1.2,
            )
            ends.append((r.label, float(days[-1]), float(ys[-1])))
    if ends:
        lo, hi = ax.get_ylim()
        ys_lab = _spread([e[2] for e in ends], (hi - lo) / 28)
        x_end = max(e[1] for e in ends)
        for (label, x, y), yl in zip(ends, ys_lab):
            ax.annotate(
                label, (x, y), xytext=(x_end * 1.03 + 1e-9, yl), fontsize=7, color=colour[label], va="center",
                fontweight="bold" if label == best else "normal", annotation_clip=False,
            )
        ax.set_xlim(right=x_end * 1.3 + 1e-9)
    ax.set_xlabel("days since first prediction (end of equal-count bin); dashed: baselines")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{result.source}: NDCG@10 over time (prequential)")
    save(fig, "ndcg_over_time.png")

    # traffic vs accuracy: every strategy and every sweep point labelled in place
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in result.results:
        if r.kind != "strategy":
            continue
        m = r.metrics["NDCG@10"]
        ax.errorbar(
            r.bytes_up_per_device_day, m.mean, yerr=[[m.mean - m.lo], [m.hi - m.mean]], fmt="o", capsize=3, color=colour[r.label],
            markersize=8 if r.label == best else 5,
        )
        ax.annotate(r.label, (r.bytes_up_per_device_day, m.mean), xytext=(6, 4), textcoords="offset points", fontsize=7,
                    color=colour[r.label], fontweight="bold" if r.label == best else "normal")
    if result.frontier:
        fx = [p["bytes_up_per_device_day"] for p in result.frontier]
        fy = [p["ndcg10"] for p in result.frontier]
        order = np.argsort(fx)
        ax.plot(np.asarray(fx)[order], np.asarray(fy)[order], "k:", alpha=0.6)
        ax.annotate("upload-policy sweep", (fx[order[-1]], fy[order[-1]]), xytext=(0, -14), textcoords="offset points", fontsize=7, color="0.3")
    ax.set_xscale("symlog", linthresh=10)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("upload bytes per device-day (symlog)")
    ax.set_ylabel("NDCG@10 (95% CI)")
    ax.set_title("traffic vs accuracy")
    save(fig, "bytes_vs_ndcg.png")

    # latency: p50 and p99 bars per reranking strategy (not overlapping histograms)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.42 * max(1, sum(1 for r in result.results if r.latency))))
    lat = [r for r in ordered if r.kind == "strategy" and r.latency]
    if lat:
        y = np.arange(len(lat))
        p50 = [r.latency.get("p50_ms", 0.0) for r in lat]
        p99 = [r.latency.get("p99_ms", 0.0) for r in lat]
        ax.barh(y + 0.2, p50, height=0.38, color="#4c78a8", label="p50")
        ax.barh(y - 0.2, p99, height=0.38, color="#f58518", label="p99")
        for yi, a, b in zip(y, p50, p99):
            ax.annotate(f"{a:.2f}", (a, yi + 0.2), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
            ax.annotate(f"{b:.2f}", (b, yi - 0.2), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(y, [r.label for r in lat], fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.15)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no strategy reranks on device", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("on-device ranking latency, ms (simulated device = this CPU)")
    ax.set_title("device rerank latency (p50 / p99)")
    save(fig, "latency.png")
    return pngs


# -- writers ---------------------------------------------------------------------------
def render_markdown(result: EvaluationResult, plot_names: list[str]) -> str:
    c = result.config
    win = verdict(result)
    lines = [
        f"# Tandem evaluation: {result.source}",
        "",
        f"**{win.line()}**" if win else "**Verdict: no strategy produced a score.**",
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
                "stream->index (events)": _num(st.get("stream_to_index_events"), "{:.0f}"),
                "update->effect (events)": _num(st.get("update_to_effect_events"), "{:.0f}"),
                "shown list age (min)": _num(st.get("shown_list_age_min"), "{:.1f}"),
                "rounds": str(r.rounds),
            }
        )
    return out


def render_html(result: EvaluationResult, pngs: dict[str, bytes]) -> str:
    win = verdict(result)
    beaten = {name for name, _ in win.beaten_by} if win else set()

    def table(rows: list[dict[str, str]], key: str = "strategy") -> str:
        if not rows:
            return ""
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = []
        for row in rows:
            label = row.get(key, "")
            cls = "win" if win and label == win.best else ("beats" if label in beaten else ("baseline" if row.get("kind") == "baseline" else ""))
            cells = "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in cols)
            body.append(f"<tr class='{cls}'>{cells}</tr>" if cls else f"<tr>{cells}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(b).decode()}"/><figcaption>{html.escape(n)}</figcaption></figure>'
        for n, b in pngs.items()
    )
    md_intro = render_markdown(result, []).split("## Strategies")[0].replace("# ", "", 1)
    intro = md_intro.split("\n", 1)[1].strip().split("\n\n", 1)[-1]  # the verdict is drawn on its own below
    verdict_html = (
        f"<p id='verdict' class='verdict'>{html.escape(win.line())}</p>" if win else "<p id='verdict' class='verdict'>Verdict: no strategy produced a score.</p>"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Tandem evaluation: "
        + html.escape(result.source)
        + "</title><style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}th{background:#eee}td:first-child{text-align:left}"
        ".verdict{font-size:16px;font-weight:bold;background:#eef7ee;border-left:6px solid #2ca02c;padding:.6em 1em}"
        "tr.win td{background:#d9f2d9;font-weight:bold}tr.beats td{background:#fff3cd}tr.baseline td{color:#555}"
        ".legend span{display:inline-block;padding:1px 6px;margin-right:8px;font-size:12px}"
        "figure{display:inline-block;margin:1em;vertical-align:top}</style></head><body>",
        f"<h1>Tandem evaluation: {html.escape(result.source)}</h1>",
        verdict_html,
        "<p>" + html.escape(intro).replace("\n\n", "</p><p>") + "</p>",
        "<h2>Strategies</h2>",
        "<p class='legend'><span style='background:#d9f2d9'>best strategy</span><span style='background:#fff3cd'>baseline that beats it</span>"
        "<span style='color:#555'>other baselines (grey)</span> sorted by NDCG@10, best first</p>",
        table(table_rows(result)),
        "<h2>Plots</h2>",
        imgs,
    ]
    if result.frontier:
        parts += ["<h2>Upload policy sweep</h2>", table(_frontier_rows(result), key="variant")]
    parts += ["<h2>All cut-offs</h2>", table(cutoff_rows(result)), "<h2>Staleness and traffic</h2>", table(_ops_rows(result))]
    parts += ["<h2>Timing</h2>", table(timing_rows(result), key="part")]
    if result.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in result.notes] + ["</ul>"]
    parts += ["</body></html>"]
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
