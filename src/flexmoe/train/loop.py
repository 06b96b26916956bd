"""The training loop: optimizer, LR schedule, steps, evaluation, checkpoints, metrics, trace.

Legend: B batch, S sequence, V vocabulary, L MoE layers, E experts, W ranks.
Everything a resumed run needs lives in ``Trainer.state_dict()``; with it a run stopped after
a checkpoint continues with exactly the losses of an uninterrupted one (CPU, same world size).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import collectives
from ..layer import moe_layers
from ..models.gpt import GPTMoE, ModelConfig
from ..placement import CostModel, make_planner
from ..runtime import MoERuntime, PlacementScheduler
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import WindowStream
from .distributed import DistInfo, clip_gradients, main_rank_error, rank_seed, shown
from .guard import MAX_SKIPS_IN_A_ROW, DivergenceError, reduce_losses
from .metrics import MetricsLog, balance_ratio
from .similarity import expert_similarity


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or the gate step)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up, then cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Progress:
    """The main rank's progress bar (None: not shown); the first failed output (the terminal is
    gone: ``shown``) turns it off for the rest of the run instead of raising."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            shown(self._open, total, initial)

    def _open(self, total: int, initial: int) -> None:
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def _show(self, show, *args, **kwargs) -> None:
        if self._bar is not None and not shown(show, *args, **kwargs):
            self._bar.disable = True  # tqdm writes nothing more, not even when closed
            self._bar = None

    def step(self, postfix: dict) -> None:
        if self._bar is not None:
            self._show(self._bar.set_postfix, postfix, refresh=False)
            self._show(self._bar.update, 1)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._show(self._bar.write, line)

    def close(self) -> None:
        if self._bar is not None:
            self._show(self._bar.close)


class Trainer:
    """Runs ``TrainConfig.steps`` optimizer steps of ``model`` on ``stream``.

    val_windows: [N, S+1] fixed validation windows (this rank's share).
    trace: a ``flexmoe.sim.trace.TraceRecorder`` (main rank) or None; it gets the routing counts
        of every step, all ranks gathered, under 0-based step indices.
    With ``cfg.placement_interval`` a ``flexmoe.PlacementScheduler`` re-plans expert placement;
    its cost model is measured once per run and kept in the checkpoints (``cost_model`` restores
    it), so a resumed run plans exactly as the uninterrupted one.
    """

    def __init__(self, model: GPTMoE, model_cfg: ModelConfig, cfg: TrainConfig, stream: WindowStream,
                 val_windows: np.ndarray, run_dir: Path, device: torch.device, info: DistInfo,
                 metrics: MetricsLog, trace=None, progress: bool = True, checkpoint_meta: dict | None = None,
                 cost_model: dict | None = None):
        self.model = model
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.stream = stream
        self.val_windows = torch.from_numpy(val_windows.astype(np.int64))
        self.run_dir = Path(run_dir)
        self.device = device
        self.info = info
        self.metrics = metrics
        self.trace = trace
        self.write_error: str | None = None  # the main rank's first failed file write (one line)
        self.progress = progress and info.is_main
        self.checkpoint_meta = checkpoint_meta or {}
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s))
        self.omoe = None
        if cfg.omoe and model_cfg.is_moe:
            from ..optim import OMoE

            self.omoe = OMoE(self.optimizer, model, cfg.omoe_config())
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_s = 0.0
        self.moe = moe_layers(model)
        self.autocast = cfg.precision == "bf16" and device.type == "cuda"
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.placement = None
        if cfg.placement_interval:
            self.placement = PlacementScheduler(
                model, self.optimizer, planner=make_planner("greedy"), interval=cfg.placement_interval,
                cost_model=None if cost_model is None else CostModel(**cost_model))
        self.moe_runtime = MoERuntime(model, dp_group=info.group, placement=self.placement)

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "data": self.stream.state_dict(),
            "optimizer": ckpt.optimizer_state_to_logical(
                self.model, ckpt.optimizer_state_by_name(self.model, self.optimizer)),
            "scheduler": self.scheduler.state_dict(),
            "rng": self._gather(rng),
            "placement": None if self.placement is None else self._gather(self.placement.state_dict()),
            "placement_cost_model": None if self.placement is None else dataclasses.asdict(self.placement.cost_model),
            "world_size": self.info.world_size,
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            **self.checkpoint_meta,
        }

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor], source: str) -> None:
        """Placement tables first (same world size only), then weights, optimizer, schedule, data, RNG."""
        same_world = int(state["world_size"]) == self.info.world_size
        if self.placement is not None and state.get("placement") and same_world:
            self.placement.load_state_dict(state["placement"][self.info.rank])
        ckpt.load_weights(self.model, weights)
        ckpt.load_optimizer_state(self.model, self.optimizer,
                                  ckpt.optimizer_state_to_slots(self.model, state["optimizer"]), source)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed_s = float(state["elapsed_s"])
        self.stream.load_state_dict(state["data"])
        rngs = state["rng"]
        if same_world:
            mine = rngs[self.info.rank]
            torch.set_rng_state(mine["torch"])
            if self.device.type == "cuda" and "cuda" in mine:
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            torch.manual_seed(rank_seed(self.cfg.seed, self.info.rank, self.step))

    def _gather(self, item) -> list:
        """This rank's ``item`` from every rank (rank order)."""
        if self.info.world_size == 1:
            return [item]
        return collectives.all_gather_object(item, group=self.info.group)

    def save_checkpoint(self) -> Path | None:
        """Collective: every rank gathers its share; the main rank writes; a failed write (full
        disk, non-finite values, or an earlier metrics write: then no checkpoint is written)
        raises on every rank, so none waits for the others."""
        state = self.state_dict()
        weights = ckpt.unique_state_dict(self.model)
        path, error = None, self.write_error
        if self.info.is_main and error is None:
            try:
                meta = ckpt.metadata_json(model_config=self.model_cfg.to_dict(), step=self.step, **self.checkpoint_meta)
                path = ckpt.save_checkpoint(self.run_dir, self.step, weights, state, meta,
                                            keep=self.cfg.keep_checkpoints)
            except ckpt.CheckpointError as err:
                error = str(err)
            except Exception as err:  # raised here alone, it would leave the others waiting below
                error = ckpt.write_failure(self.run_dir, f"checkpoint step {self.step}", err)
        error = main_rank_error(error, self.info)
        if error is not None:
            raise ckpt.CheckpointWriteError(error)
        return path

    def main_write(self, write, what: Path, *args) -> None:
        """``write(*args)`` on the main rank; its failure (an OSError: full disk, read-only file;
        or any other exception) is kept as ``write_error`` instead of raised, later writes are
        dropped, and every rank raises it at the next agreement point: the step's loss
        all-reduce, a checkpoint, the end of the run (the other ranks would otherwise wait
        forever in the next collective)."""
        if not self.info.is_main or self.write_error is not None:
            return
        try:
            write(*args)
        except Exception as err:
            self.write_error = ckpt.write_failure(self.run_dir, getattr(err, "filename", None) or str(what), err)

    # ---- steps -------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        window_BS = torch.from_numpy(
            self.stream.next_batch(self.cfg.batch_size, self.info.rank, self.info.world_size).astype(np.int64)
        ).to(self.device)
        return window_BS[:, :-1], window_BS[:, 1:]

    def _forward_loss(self, x_BS: torch.Tensor, y_BS: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits_BSV = self.model(x_BS)
        return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), y_BS.reshape(-1))

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        self.moe_runtime.before_forward(self.step)
        lm_total = aux_total = 0.0
        counts_LE = None
        for _ in range(cfg.grad_accum):
            x_BS, y_BS = self._batch()
            lm_loss = self._forward_loss(x_BS, y_BS)
            extra = self.moe_runtime.aux_loss()
            ((lm_loss + extra) / cfg.grad_accum).backward()
            if cfg.grad_accum > 1:
                self.moe_runtime.observe()
            lm_total += lm_loss.detach() / cfg.grad_accum
            aux_total += extra.detach() / cfg.grad_accum
            if self.moe:
                micro = torch.stack([layer.last_counts.detach().to(torch.int64) for layer in self.moe])
                counts_LE = micro if counts_LE is None else counts_LE + micro
        self.moe_runtime.after_backward()
        verdict = reduce_losses(lm_total, aux_total, self.model, self.info, self.write_error is not None)
        if verdict.write_failed:  # before this step updates anything
            raise ckpt.CheckpointWriteError(main_rank_error(self.write_error, self.info))
        lm, aux = verdict.lm, verdict.aux
        if verdict.nonfinite is not None:
            return self._nonfinite_step(verdict.nonfinite, lm, aux)
        grad_norm = clip_gradients(self.model, cfg.grad_clip, self.info) if cfg.grad_clip > 0 else torch.zeros(())
        lr = self.optimizer.param_groups[0]["lr"]
        if self.omoe is not None:
            self.omoe.load_state_dict({"steps": self.step})  # OMoE's alternation follows the training step
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        planned = self.moe_runtime.after_optimizer_step()
        self.step += 1
        tokens = cfg.grad_accum * cfg.batch_size * self.model_cfg.seq_len * self.info.world_size
        self.tokens_seen += tokens
        record = {"kind": "train", "step": self.step, "loss": lm + aux, "lm_loss": lm, "aux_loss": aux,
                  "lr": lr, "grad_norm": float(grad_norm), "tokens": self.tokens_seen}
        if counts_LE is not None:
            counts_WLE = self._gather_counts(counts_LE)
            ratio_L = balance_ratio(counts_WLE.sum(0))
            record["balance"] = float(ratio_L.mean())
            record["balance_per_layer"] = [round(float(r), 4) for r in ratio_L]
            per_layer = counts_WLE.sum(axis=(0, 2)) / tokens
            record["experts_per_token"] = float(per_layer.mean())
            record["experts_per_token_per_layer"] = [round(float(k), 4) for k in per_layer]
            if self.trace is not None:
                for layer in range(counts_WLE.shape[1]):
                    self.main_write(self.trace.record, self.trace.path, self.step - 1, layer, counts_WLE[:, layer])
        if planned:
            record["placement"] = {"bytes_moved": planned.get("bytes_moved"),
                                   "balance_predicted": [m.get("balance_predicted_new") for m in planned["layers"]]}
        return record

    def _nonfinite_step(self, reason: str, lm: float, aux: float) -> dict:
        """A step with a non-finite loss or gradient (every rank agrees): stop before anything is
        updated (``on_nonfinite="stop"``), or drop its gradients and move on to the next batch."""
        self.optimizer.zero_grad(set_to_none=True)
        step = self.step + 1
        in_a_row = 1 + next((i for i, r in enumerate(reversed(self.history)) if "skipped" not in r), len(self.history))
        if self.cfg.on_nonfinite == "stop" or in_a_row >= MAX_SKIPS_IN_A_ROW:
            newest = ckpt.list_checkpoints(self.run_dir)
            if in_a_row > 1:
                reason += f" ({in_a_row} non-finite steps in a row: the weights have diverged)"
            remedy = "a lower learning rate (--resume --lr X --override lr)"
            if self.cfg.on_nonfinite == "stop":
                remedy += " or --on-nonfinite skip --override on-nonfinite"
            resume = (f"resume from the newest checkpoint, {newest[-1].name} (finite), with {remedy}" if newest
                      else "no checkpoint was written yet: start again with a lower --lr")
            raise DivergenceError(f"step {step}: {reason}; training stopped before the update, "
                                  f"no checkpoint was written for it; {resume}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step = step
        self.tokens_seen += self.cfg.grad_accum * self.cfg.batch_size * self.model_cfg.seq_len * self.info.world_size
        if self.info.is_main:
            shown(tqdm.write, f"flexmoe train: step {step}: {reason}; step skipped (--on-nonfinite skip)",
                  file=sys.stderr)
        return {"kind": "train", "step": step, "loss": lm + aux, "lm_loss": lm, "aux_loss": aux, "lr": lr,
                "tokens": self.tokens_seen, "skipped": reason}

    def _gather_counts(self, counts_LE: torch.Tensor) -> np.ndarray:
        if self.info.world_size == 1:
            return counts_LE.cpu().numpy()[None]
        parts = [torch.empty_like(counts_LE) for _ in range(self.info.world_size)]
        collectives.all_gather(parts, counts_LE, group=self.info.group)
        return torch.stack(parts).cpu().numpy()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy over the fixed validation windows (all ranks)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for start in range(0, len(self.val_windows), self.cfg.batch_size):
                window_BS = self.val_windows[start:start + self.cfg.batch_size].to(self.device)
                loss = self._forward_loss(window_BS[:, :-1], window_BS[:, 1:])
                n = window_BS[:, 1:].numel()
                total += torch.stack([loss.double() * n, torch.tensor(float(n), device=self.device, dtype=torch.float64)])
        if self.info.world_size > 1:
            collectives.all_reduce(total, group=self.info.group)
        self.model.train()
        return float(total[0] / total[1])

    def _validate(self, bar) -> None:
        val = self.evaluate()
        record = {"kind": "val", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 700.0))}
        record.update(expert_similarity(self.model, self.val_windows[:2, :-1].to(self.device)))
        self.val_history.append(record)
        if self.info.is_main:
            self.main_write(self.metrics.write, self.metrics.path, record)
            bar.write(f"step {self.step:>6}: val loss {val:.4f}  ppl {record['val_ppl']:.2f}")

    # ---- run ---------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or stop after ``stop_at`` with a checkpoint, as a kill would)."""
        cfg = self.cfg
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        bar = Progress(cfg.steps, self.step, self.progress)
        if self.step == 0 and self.step < last:
            self._validate(bar)
        tic = time.perf_counter()
        window_tokens, window_start = 0, tic
        try:
            while self.step < last:
                record = self.train_step()
                now = time.perf_counter()
                window_tokens += cfg.grad_accum * cfg.batch_size * self.model_cfg.seq_len * self.info.world_size
                record["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                record["elapsed_s"] = self.elapsed_s + (now - tic)
                if now - window_start > 5.0:
                    window_tokens, window_start = 0, now
                self.history.append(record)
                if self.info.is_main:
                    self.main_write(self.metrics.write, self.metrics.path, record)
                    postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                    if "balance" in record:
                        postfix["expert_bal"] = f"{record['balance']:.2f}"
                    bar.step(postfix)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self._validate(bar)
                if self.step % cfg.checkpoint_every == 0 or self.step == last:
                    self.elapsed_s += time.perf_counter() - tic
                    tic = time.perf_counter()
                    self.save_checkpoint()
        finally:
            bar.close()
        self.elapsed_s += time.perf_counter() - tic
        return self.summary()

    def summary(self) -> dict:
        train = [r["loss"] for r in self.history]
        out = {"kind": "summary", "step": self.step, "tokens": self.tokens_seen, "elapsed_s": self.elapsed_s,
               "finished": self.step >= self.cfg.steps}
        skipped = sum(1 for r in self.history if "skipped" in r)
        if skipped:
            out["skipped_steps"] = skipped
        train = [loss for loss in train if math.isfinite(loss)]
        if train:
            k = max(1, min(10, len(train) // 4))
            head, tail = train[:k], train[-k:]
            out["train_loss_first"] = sum(head) / len(head)
            out["train_loss_last"] = sum(tail) / len(tail)
            out["train_loss_window"] = k  # both are means over this many steps
        if self.val_history:
            out["val_loss_first"] = self.val_history[0]["val_loss"]
            out["val_loss"] = self.val_history[-1]["val_loss"]
            out["val_ppl"] = self.val_history[-1]["val_ppl"]
        return out
