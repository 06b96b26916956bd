"""Synthetic routing traces: Zipf-skewed expert popularity whose order drifts over time.

Legend: T steps, L layers, W source ranks, E experts, K experts per token (top-k).

Per layer every expert has a popularity score following an Ornstein-Uhlenbeck process
``s <- (1 - drift) * s + sqrt(1 - (1 - drift)^2) * N(0, 1)`` (stationary N(0, 1), correlation time
about 1 / drift steps). The score's upper tail probability ``u = 1 - Phi(s)`` is uniform on
[0, 1], so ``position = 1 + (E - 1) * u`` is a continuous stand-in for the popularity rank and
``p ~ position^-alpha`` is Zipf-skewed at every step, while each expert's weight changes
continuously (a hot expert cools down as others heat up). Each source rank scales
the weights by a fixed log-normal bias (``rank_skew``) and a fresh per-step one (``step_noise``).
A token picks K distinct experts, so expert e is picked by a token with probability
``pi_e = min(1, c * p_e)`` where c makes ``sum(pi) = K``; a rank's count is Binomial(tokens, pi_e).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .trace import RoutingTrace


@dataclasses.dataclass(frozen=True)
class SyntheticTraceConfig:
    num_steps: int = 1000
    num_layers: int = 1
    world_size: int = 8
    num_experts: int = 64
    tokens_per_rank: int = 16384
    top_k: int = 8
    alpha: float = 1.0
    drift: float = 0.002
    rank_skew: float = 0.2
    step_noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "num_layers", "world_size", "num_experts", "tokens_per_rank", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.drift <= 1:
            raise ValueError(f"drift must be in [0, 1], got {self.drift}")
        for name in ("rank_skew", "step_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def inclusion_probabilities(p_E: np.ndarray, k: int) -> np.ndarray:
    """``pi_e = min(1, c * p_e)`` with c chosen so that ``sum(pi) = k`` (needs k <= number of p_e > 0)."""
    p_E = np.asarray(p_E, dtype=np.float64)
    order = np.argsort(-p_E, kind="stable")
    pi_E = np.zeros_like(p_E)
    capped = 0
    tail = p_E[order].sum()
    for e in order:
        c = (k - capped) / tail if tail > 0 else 0.0
        if c * p_E[e] <= 1.0:
            pi_E = np.minimum(c * p_E, 1.0)
            pi_E[order[:capped]] = 1.0
            return pi_E
        capped += 1
        tail -= p_E[e]
    return np.ones_like(p_E)


def _upper_tail(s: np.ndarray) -> np.ndarray:
    """1 - Phi(s) of the standard normal."""
    return 0.5 * np.vectorize(math.erfc)(s / math.sqrt(2.0))


def generate_trace(config: SyntheticTraceConfig) -> RoutingTrace:
    """A trace of ``config.num_steps`` steps (deterministic in ``config.seed``)."""
    c = config
    rng = np.random.default_rng(c.seed)
    L, W, E = c.num_layers, c.world_size, c.num_experts
    score_LE = rng.standard_normal((L, E))
    bias_LWE = rng.normal(0.0, c.rank_skew, (L, W, E))
    rho = 1.0 - c.drift
    kick = np.sqrt(max(1.0 - rho * rho, 0.0))
    counts = np.zeros((c.num_steps, L, W, E), dtype=np.int64)
    for t in range(c.num_steps):
        if t > 0:
            score_LE = rho * score_LE + kick * rng.standard_normal((L, E))
        noise_LWE = rng.normal(0.0, c.step_noise, (L, W, E))
        for layer in range(L):
            position_E = 1.0 + (E - 1) * _upper_tail(score_LE[layer])
            p_E = position_E ** -c.alpha
            for w in range(W):
                q_E = p_E * np.exp(bias_LWE[layer, w] + noise_LWE[layer, w])
                counts[t, layer, w] = rng.binomial(c.tokens_per_rank, inclusion_probabilities(q_E / q_E.sum(), c.top_k))
    return RoutingTrace(counts, np.arange(c.num_steps), {"synthetic": dataclasses.asdict(c)})
