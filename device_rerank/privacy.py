"""Per-device privacy accounting for the Gaussian mechanism (Renyi DP).

Why RDP: a device sends many noisy updates over its life; RDP composes by
addition per order and converts to a tight (epsilon, delta) at the end
(Mironov 2017). The device refuses to send once the next release would push
epsilon past its budget.

* plain Gaussian, sensitivity C, std z*C: ``RDP(alpha) = alpha / (2 z^2)``;
* Poisson-subsampled Gaussian with rate q (integer alpha, Mironov, Talwar & Zhang 2019):
  ``RDP(alpha) = log(sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k)/(2 z^2))) / (alpha-1)``;
  fractional alpha uses the value at ceil(alpha) (RDP is non-decreasing in alpha);
* conversion: ``epsilon = min_alpha RDP(alpha) + log(1/delta) / (alpha - 1)``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from device_rerank.config import PrivacyConfig

logger = logging.getLogger(__name__)

#: Fine fractional grid near 1 (where tight epsilons live for large T) plus integers up to 256.
DEFAULT_ORDERS: np.ndarray = np.concatenate([np.round(np.arange(1.01, 11.0, 0.01), 2), np.arange(11, 257, dtype=np.float64)])


def rdp_gaussian(noise_multiplier: float, orders: np.ndarray = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one plain Gaussian release at each order (inf when there is no noise)."""
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    return np.asarray(orders, dtype=np.float64) / (2.0 * noise_multiplier**2)


def _log_a_int(q: float, z: float, alpha: int) -> float:
    """log A_alpha of the subsampled Gaussian for integer alpha (log-sum-exp of the binomial expansion)."""
    ks = np.arange(alpha + 1, dtype=np.float64)
    log_binom = np.array([math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1) for k in range(alpha + 1)])
    with np.errstate(divide="ignore"):
        terms = log_binom + ks * math.log(q) + (alpha - ks) * (math.log1p(-q) if q < 1 else -np.inf) + (ks * ks - ks) / (2 * z * z)
    if q >= 1:
        terms = np.where(ks == alpha, log_binom + (ks * ks - ks) / (2 * z * z), -np.inf)
    m = float(np.max(terms))
    return m + math.log(float(np.sum(np.exp(terms - m))))


def rdp_subsampled_gaussian(sample_rate: float, noise_multiplier: float, orders: np.ndarray = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian release (equals ``rdp_gaussian`` at rate 1)."""
    if not 0 <= sample_rate <= 1:
        raise ValueError("sample_rate must be in [0, 1]")
    if sample_rate == 0:
        return np.zeros(len(orders))
    if sample_rate == 1:
        return rdp_gaussian(noise_multiplier, orders)
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    cache: dict[int, float] = {}
    out = np.empty(len(orders))
    for i, a in enumerate(np.asarray(orders, dtype=np.float64)):
        ai = max(2, int(math.ceil(a)))
        if ai not in cache:
            cache[ai] = _log_a_int(sample_rate, noise_multiplier, ai) / (ai - 1)
        out[i] = cache[ai]
    return out


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) for a composed RDP curve (Mironov's conversion)."""
    orders = np.asarray(orders, dtype=np.float64)
    eps = rdp + math.log(1.0 / delta) / (orders - 1.0)
    i = int(np.nanargmin(eps))
    return float(eps[i]), float(orders[i])


class PrivacyAccountant:
    """Tracks one device's composed RDP and its (epsilon, delta) budget.

    Args:
        config: ``delta`` for reporting, ``max_epsilon`` for refusing (None = never refuse).
        orders: RDP orders to track.
    """

    def __init__(self, config: PrivacyConfig | None = None, orders: np.ndarray = DEFAULT_ORDERS) -> None:
        self.config = config or PrivacyConfig()
        self.orders = np.asarray(orders, dtype=np.float64)
        self.rdp = np.zeros(len(self.orders))
        self.releases = 0

    def _step_rdp(self, noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
        return steps * rdp_subsampled_gaussian(sample_rate, noise_multiplier, self.orders)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (config delta by default); 0 before any release."""
        if self.releases == 0:
            return 0.0
        return rdp_to_epsilon(self.rdp, delta or self.config.delta, self.orders)[0]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1) -> float:
        """Epsilon if one more release with these settings were made."""
        rdp = self.rdp + self._step_rdp(noise_multiplier, sample_rate, steps)
        return rdp_to_epsilon(rdp, self.config.delta, self.orders)[0]

    def can_release(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1) -> bool:
        """False when the release would exceed ``max_epsilon``."""
        if self.config.max_epsilon is None:
            return True
        return self.epsilon_after(noise_multiplier, sample_rate, steps) <= self.config.max_epsilon

    def spend(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1) -> float:
        """Record a release; returns the new epsilon."""
        self.rdp = self.rdp + self._step_rdp(noise_multiplier, sample_rate, steps)
        self.releases += steps
        eps = self.epsilon()
        logger.debug("privacy release %d: epsilon=%.3f at delta=%g", self.releases, eps, self.config.delta)
        return eps
