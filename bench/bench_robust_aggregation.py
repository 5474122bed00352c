"""Poisoned-device bench for the aggregation rules (tandem/strategies/aggregate.py).

Why: a rule is only robust if it is measured against the attacks it must survive, on the
updates Tandem really sends (sparse top-k deltas, not dense vectors).

Setup: N devices; each honest device sends the top-``k`` of ``g + noise`` (d coordinates).
A fraction of devices is poisoned:

* ``huge-norm``: random values of scale 1e6 on ``k`` random coordinates;
* ``sign-flip``: ``-10 x`` its honest update (same support);
* ``constant``: every attacker sends the same vector, ``+10 x`` the typical honest value
  on the same ``k`` coordinates.

Figure: relative deviation ``|agg - honest| / |honest|`` where ``honest`` is FedAvg over the
honest devices only (what the round would give with no attacker). Also prints the result
with no poison (the rule's own bias) and, last, the fraction of a catalogue of bad inputs
(forged envelopes, hostile wire records, out-of-range events, corrupt logs, HTTP abuse)
that the system handles cleanly (a clear error, a 4xx or a dead letter with a reason).

Run: ``PYTHONPATH=. python bench/bench_robust_aggregation.py [--n 100 --d 500 --k 50 --seeds 5]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.strategies.aggregate import DEFAULT_RULE, RULES, combine, fedavg  # noqa: E402

ATTACKS = ("none", "huge-norm", "sign-flip", "constant")
FRACTIONS = (0.1, 0.3, 0.4)


def honest_round(rng: np.random.Generator, n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(deltas, mask, weights) of ``n`` honest sparse top-k updates around one true gradient."""
    g = rng.normal(size=d)
    full = g[None, :] + rng.normal(scale=1.0, size=(n, d))
    mask = np.zeros((n, d), dtype=bool)
    top = np.argpartition(-np.abs(full), k - 1, axis=1)[:, :k]
    np.put_along_axis(mask, top, True, axis=1)
    deltas = np.where(mask, full, 0.0) * 0.01
    weights = rng.integers(5, 50, size=n).astype(np.float64)
    return deltas, mask, weights


def poison(rng: np.random.Generator, deltas: np.ndarray, mask: np.ndarray, weights: np.ndarray, attack: str,
           frac: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replace the first ``frac * n`` devices by attackers; returns (deltas, mask, weights, honest index)."""
    n, d = deltas.shape
    m = int(round(frac * n)) if attack != "none" else 0
    deltas, mask, weights = deltas.copy(), mask.copy(), weights.copy()
    typical = float(np.abs(deltas[mask]).mean())
    const_support = rng.choice(d, size=k, replace=False)
    for i in range(m):
        if attack == "huge-norm":
            support = rng.choice(d, size=k, replace=False)
            mask[i] = False
            mask[i, support] = True
            deltas[i] = 0.0
            deltas[i, support] = rng.normal(scale=1e6, size=k)
        elif attack == "sign-flip":
            deltas[i] = -10.0 * deltas[i]
        elif attack == "constant":
            mask[i] = False
            mask[i, const_support] = True
            deltas[i] = 0.0
            deltas[i, const_support] = 10.0 * typical
        weights[i] = weights.max()
    return deltas, mask, weights, np.arange(m, n)


def deviation(rule: str, attack: str, frac: float, n: int, d: int, k: int, seeds: int, trim: float = 0.2) -> float:
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        base, mask, w = honest_round(rng, n, d, k)
        x, m, w2, honest = poison(rng, base, mask, w, attack, frac, k)
        ref = fedavg(base[honest], w[honest])
        agg = combine(x, w2, rule, trim_fraction=trim, mask=m)
        out.append(float(np.linalg.norm(agg - ref) / np.linalg.norm(ref)))
    return float(np.median(out))


def fmt(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2f}"


def aggregation_table(n: int, d: int, k: int, seeds: int) -> dict[tuple[str, str, float], float]:
    rules: list[tuple[str, str, float]] = []
    for rule in RULES:
        if "trimmed_mean" in rule:
            rules += [(f"{rule} {t}", rule, t) for t in (0.1, 0.2, 0.3)]
        else:
            rules.append((rule, rule, 0.2))
    cols = [("none", 0.0)] + [(a, f) for f in FRACTIONS for a in ATTACKS[1:]]
    res: dict[tuple[str, str, float], float] = {}
    print(f"Relative deviation from the honest FedAvg (N={n}, d={d}, top-k={k}, median of {seeds} seeds)")
    print("| rule | " + " | ".join("no poison" if a == "none" else f"{int(f * 100)}% {a}" for a, f in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, rule, trim in rules:
        row = []
        for a, f in cols:
            v = deviation(rule, a, f, n, d, k, seeds, trim)
            res[(label, a, f)] = v
            row.append(fmt(v))
        mark = " (default)" if rule == DEFAULT_RULE else ""
        print(f"| {label}{mark} | " + " | ".join(row) + " |")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=500)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    for name in ("n", "d", "k", "seeds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.k > args.d:
        ap.error("--k must be <= --d")
    res = aggregation_table(args.n, args.d, args.k, args.seeds)
    worst = max(res[(DEFAULT_RULE, a, 0.1)] for a in ATTACKS[1:])
    print(f"\ndefault rule {DEFAULT_RULE}: worst deviation at 10% poison = {worst:.3f} (target <= 0.5)")
    try:
        from adversarial_catalogue import run_catalogue  # bench/adversarial_catalogue.py
    except ImportError:
        return 0
    clean, total, dirty = run_catalogue()
    print(f"\nbad inputs handled cleanly: {clean}/{total} = {clean / total:.1%}")
    for name, why in dirty:
        print(f"  NOT clean: {name}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
