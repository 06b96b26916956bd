"""Load predictors: turn the routing counts of past steps into the counts a plan should balance for.

Legend: W source ranks, E experts, N steps in the predictor's window.

A plan is kept for the re-plan interval, so the prediction should stand for the next interval,
not for one step. Every predictor is updated once per step with that step's all-gathered counts
``counts_WE`` and is a pure function of them, so every rank predicts the same.

    ema          ema = decay * ema + (1 - decay) * counts          (decay 0: the last step)
    window_max   per (rank, expert) maximum over the last ``window`` steps (plans for peaks)
    mean_std     mean + z * std over the last ``window`` steps (clipped at 0)
    trend        least-squares line through the last ``window`` steps, evaluated ``lead`` steps
                 ahead (the middle of the next interval), clipped at 0
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

PREDICTORS = ("ema", "window_max", "mean_std", "trend")


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Which predictor and its options (see the module docstring); ``make()`` builds one."""

    kind: str = "ema"
    decay: float = 0.0
    window: int = 20
    z: float = 1.0
    lead: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in PREDICTORS:
            raise ValueError(f"PredictorConfig.kind must be one of {PREDICTORS}, got {self.kind!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"PredictorConfig.decay must be in [0, 1), got {self.decay}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"PredictorConfig.window must be an int >= 1, got {self.window!r}")
        if not np.isfinite(self.z) or self.z < 0:
            raise ValueError(f"PredictorConfig.z must be finite and >= 0, got {self.z}")
        if not np.isfinite(self.lead) or self.lead < 0:
            raise ValueError(f"PredictorConfig.lead must be finite and >= 0, got {self.lead}")

    def make(self) -> "LoadPredictor":
        if self.kind == "ema":
            return LoadPredictor(self.decay)
        return WindowPredictor(self)


class LoadPredictor:
    """Exponential moving average of routing counts: ``ema = decay * ema + (1 - decay) * counts``.

    decay = 0 predicts the last step. ``predict()`` is None before the first ``update``.
    """

    def __init__(self, decay: float = 0.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.ema_WE: np.ndarray | None = None

    def update(self, counts_WE: np.ndarray) -> None:
        counts_WE = np.asarray(counts_WE, dtype=np.float64)
        if self.ema_WE is None:
            self.ema_WE = counts_WE.copy()
        else:
            self.ema_WE = self.decay * self.ema_WE + (1.0 - self.decay) * counts_WE

    def predict(self) -> np.ndarray | None:
        return None if self.ema_WE is None else self.ema_WE.copy()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "ema": None if self.ema_WE is None else self.ema_WE.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.ema_WE = None if state["ema"] is None else np.array(state["ema"], dtype=np.float64)


class WindowPredictor:
    """Predictors over the last ``config.window`` steps: windowed maximum, mean + z std, trend."""

    def __init__(self, config: PredictorConfig):
        if config.kind == "ema":
            raise ValueError("WindowPredictor needs a window kind, not 'ema' (use LoadPredictor)")
        self.config = config
        self.window: collections.deque = collections.deque(maxlen=config.window)

    def update(self, counts_WE: np.ndarray) -> None:
        self.window.append(np.asarray(counts_WE, dtype=np.float64).copy())

    def predict(self) -> np.ndarray | None:
        if not self.window:
            return None
        c = self.config
        x_NWE = np.stack(self.window)
        if c.kind == "window_max":
            return x_NWE.max(0)
        if c.kind == "mean_std":
            return x_NWE.mean(0) + c.z * x_NWE.std(0)
        n = x_NWE.shape[0]
        if n == 1:
            return x_NWE[0].copy()
        t_N = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        slope_WE = np.tensordot(t_N, x_NWE, axes=1) / (t_N * t_N).sum()
        return np.maximum(x_NWE.mean(0) + slope_WE * ((n - 1) / 2.0 + c.lead), 0.0)

    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "window": [w.tolist() for w in self.window]}

    def load_state_dict(self, state: dict) -> None:
        config = PredictorConfig(**state["config"])
        if config != self.config:
            raise ValueError(f"saved predictor {config} differs from this one {self.config}")
        self.window.clear()
        self.window.extend(np.array(w, dtype=np.float64) for w in state["window"])
