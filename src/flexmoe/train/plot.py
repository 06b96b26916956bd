"""PNG plots of a training run: loss curves, balance ratio, expert similarity, active experts per
token, and per-layer expert-load heatmaps.

Legend: T steps, L MoE layers, W ranks, E experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import last_per_step, read_metrics


class PlotError(ValueError):
    """A run folder with nothing to plot."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("flexmoe plot needs matplotlib: pip install 'flexmoe[train]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_losses(records: list[dict], out: Path, title: str) -> Path:
    plt = _pyplot()
    train = last_per_step(records, "train")
    val = last_per_step(records, "val")
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r.get("lm_loss", r["loss"]) for r in train])
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, _smooth(loss, max(1, min(50, len(loss) // 20))), color="tab:blue", label="train (smoothed)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    return _finish(plt, fig, ax, f"{title}: language-model loss", out / "loss.png")


def plot_balance(records: list[dict], out: Path, title: str) -> Path | None:
    train = [r for r in last_per_step(records, "train") if "balance_per_layer" in r]
    if not train:
        return None
    plt = _pyplot()
    steps = np.array([r["step"] for r in train])
    ratio_TL = np.array([r["balance_per_layer"] for r in train])
    fig, ax = plt.subplots(figsize=(8, 4))
    window = max(1, min(50, len(steps) // 20))
    for layer in range(ratio_TL.shape[1]):
        ax.plot(steps, _smooth(ratio_TL[:, layer], window), label=f"MoE layer {layer}")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max expert load / mean")
    smoothed = f", moving average over {window} steps" if window > 1 else ""
    return _finish(plt, fig, ax, f"{title}: expert-load balance (1 = even{smoothed})", out / "balance.png", small_legend=True)


def _plot_series(steps, series_TL: np.ndarray, out: Path, name: str, title: str, ylabel: str,
                 smooth: bool, marker: str = "") -> Path:
    """One line per MoE layer of ``series_TL`` over ``steps``, written to ``out/name``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    window = max(1, min(50, len(steps) // 20)) if smooth else 1
    for layer in range(series_TL.shape[1]):
        ax.plot(steps, _smooth(series_TL[:, layer], window), marker, label=f"MoE layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    return _finish(plt, fig, ax, title, out / name, small_legend=True)


def plot_similarity(records: list[dict], out: Path, title: str) -> Path | None:
    """Expert similarity at each evaluation: weight cosine (solid) and output cosine (dashed)."""
    val = [r for r in last_per_step(records, "val") if "expert_weight_cos_per_layer" in r]
    if not val:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in val]
    weight_TL = np.array([r["expert_weight_cos_per_layer"] for r in val])
    output_TL = np.array([r["expert_output_cos_per_layer"] for r in val])
    fig, ax = plt.subplots(figsize=(8, 4))
    for layer in range(weight_TL.shape[1]):
        line, = ax.plot(steps, weight_TL[:, layer], "o-", label=f"layer {layer} weights")
        ax.plot(steps, output_TL[:, layer], "s--", color=line.get_color(), label=f"layer {layer} outputs")
    ax.set_xlabel("step")
    ax.set_ylabel("mean pairwise cosine between experts")
    return _finish(plt, fig, ax, f"{title}: expert similarity (1 = identical experts)", out / "similarity.png", small_legend=True)


def plot_active_experts(records: list[dict], out: Path, title: str) -> Path | None:
    """Dispatched experts per token over steps (k for top-k; the DTS gate's dense phase is higher)."""
    train = [r for r in last_per_step(records, "train") if "experts_per_token_per_layer" in r]
    if not train:
        return None
    steps = np.array([r["step"] for r in train])
    return _plot_series(steps, np.array([r["experts_per_token_per_layer"] for r in train]), out,
                        "active_experts.png", f"{title}: active experts per token", "experts per token",
                        smooth=False)


def plot_expert_load(counts_TLWE: np.ndarray, steps_T: np.ndarray, out: Path, title: str,
                     blocks: list[int] | None = None, max_columns: int = 400) -> Path:
    """Heatmap per MoE layer: share of routed rows per expert (rows) over steps (columns).

    ``steps_T`` are the trace's 0-based indices; the x axis shows step numbers (index + 1), the
    numbering of the metrics and of the loss plot, where step 1 is the first optimizer step.
    """
    plt = _pyplot()
    counts_TLE = counts_TLWE.sum(axis=2).astype(np.float64)
    T, L, E = counts_TLE.shape
    starts_B = np.array([g[0] for g in np.array_split(np.arange(T), min(T, max_columns))])
    binned_BLE = np.add.reduceat(counts_TLE, starts_B, axis=0)
    share_BLE = binned_BLE / np.maximum(binned_BLE.sum(axis=-1, keepdims=True), 1)
    first, last = int(steps_T[0]) + 1, int(steps_T[-1]) + 1  # the trace's 0-based index: step numbers as in loss.png
    fig, axes = plt.subplots(L, 1, figsize=(9, 1.2 + 0.25 * E * L + 0.4 * L), squeeze=False)
    vmax = max(float(share_BLE.max()), 1.0 / E)
    for layer in range(L):
        ax = axes[layer, 0]
        im = ax.imshow(share_BLE[:, layer].T, aspect="auto", origin="lower", cmap="viridis",
                       vmin=0.0, vmax=vmax, extent=(first - 0.5, last + 0.5, -0.5, E - 0.5),
                       interpolation="nearest")
        name = f"block {blocks[layer]}" if blocks and layer < len(blocks) else f"layer {layer}"
        ax.set_ylabel(f"{name}\nexpert")
        if E <= 16:
            ax.set_yticks(range(E))
        fig.colorbar(im, ax=ax, pad=0.01, label="share of rows")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(f"{title}: expert load per MoE layer (even = {1 / E:.3f})")
    fig.tight_layout()
    path = out / "expert_load.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write every plot the run's files allow; returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run folder {run_dir} does not exist")
    records = read_metrics(run_dir)
    if not any(r.get("kind") in ("train", "val") for r in records):
        raise PlotError(f"{run_dir} has no training metrics (metrics.jsonl); is it a flexmoe train run folder?")
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    paths = [plot_losses(records, out, title)]
    balance = plot_balance(records, out, title)
    if balance is not None:
        paths.append(balance)
    for extra in (plot_similarity(records, out, title), plot_active_experts(records, out, title)):
        if extra is not None:
            paths.append(extra)
    trace_file = run_dir / "routing_trace.jsonl"
    if trace_file.is_file():
        from ..sim.trace import read_trace

        trace = read_trace(trace_file)
        if trace.num_steps:
            blocks = trace.meta.get("moe_blocks")
            paths.append(plot_expert_load(trace.counts_TLWE, trace.steps_T, out, title, blocks))
    return paths


def _finish(plt, fig, ax, title: str, path: Path, small_legend: bool = False) -> Path:
    """Title, grid and legend of a one-axis figure, then write it to ``path`` and close it."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**({"fontsize": "small", "ncol": 2} if small_legend else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
