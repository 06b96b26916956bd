"""TrainConfig and the presets of ``flexmoe train`` (a ModelConfig + a TrainConfig each)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import _require_choice, _require_float, _require_int


@dataclasses.dataclass
class TrainConfig:
    """How to train. One ``field: meaning`` entry per field (``flexmoe train --help`` shows them).

    steps: optimizer steps in total (the learning-rate schedule spans them).
    batch_size: sequences per micro-batch and rank, each ``ModelConfig.seq_len`` tokens.
    grad_accum: micro-batches per optimizer step.
    lr: peak learning rate, reached by linear warm-up, then cosine decay to min_lr at the last step.
    min_lr: learning rate at the end of the cosine decay.
    warmup_steps: steps of linear learning-rate warm-up.
    weight_decay: AdamW weight decay (on matrices only, not on norms, biases or the gate step).
    beta1: AdamW first-moment decay rate.
    beta2: AdamW second-moment decay rate.
    grad_clip: global gradient-norm clipping threshold (0 disables clipping).
    eval_every: validation loss every so many steps (and at the last step).
    eval_batches: fixed validation batches per evaluation.
    checkpoint_every: checkpoint every so many steps (a checkpoint is also written at the end).
    keep_checkpoints: how many of the newest checkpoints to keep.
    seed: seed of the weight initialisation, the data order and every step's random numbers.
    tokenizer: "byte" (256 byte values) or "bpe" (trained on the training split).
    bpe_vocab_size: vocabulary size of the "bpe" tokenizer.
    data: a text file or folder of text files; None is the Python standard library's source;
        "site-packages" every .py file of the installed packages, deduplicated (``flexmoe.train.data``).
    val_fraction: share of files (by a hash of their path) held out for validation.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    precision: "fp32", or "bf16": on CUDA, bfloat16 autocast with float32 master weights (attention,
        dense FFNs, LM head and MoE experts compute in bfloat16, the router in float32); on CPU
        the run stays fp32.
    threads: torch CPU threads (``torch.set_num_threads``); 0 keeps torch's default. Small models
        gain little from threads, and oversubscribed threads on a busy machine are much slower.
    expert_parallel: under torchrun, spread each MoE block's experts over the ranks
        (``MoELayer(config, ep_group=WORLD)``) instead of replicating them.
    spare_slots: extra expert slots per rank (with expert_parallel), room for the placement
        scheduler's replicas.
    placement_interval: re-plan expert placement every so many steps with
        ``flexmoe.PlacementScheduler`` (greedy planner); 0 = static placement. Needs expert_parallel.
    on_nonfinite: a step whose loss or gradients hold NaN or inf (on any rank) is never applied;
        "stop" ends training with an error naming the step (the checkpoints stay finite), "skip"
        drops that step's update and goes on with the next batch (recorded as ``skipped``).
    omoe: OMoE (``flexmoe.optim.OMoE``, arXiv 2310.09762): expert updates projected orthogonally to
        the other experts' weights, alternating with plain AdamW steps.
    omoe_accumulate_steps: plain AdamW steps of each OMoE cycle.
    omoe_orthogonal_steps: projected steps of each OMoE cycle.
    omoe_alpha: OWM's ridge term of the OMoE projection (0 = exact orthogonal projection).
    """

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = 4096
    data: str | None = None
    val_fraction: float = 0.05
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int = 0
    expert_parallel: bool = False
    spare_slots: int = 0
    placement_interval: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    omoe: bool = False
    omoe_accumulate_steps: int = 1
    omoe_orthogonal_steps: int = 1
    omoe_alpha: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_checkpoints", "bpe_vocab_size"):
            _require_int(self, name, minimum=1)
        for name in ("warmup_steps", "seed", "spare_slots", "placement_interval", "threads"):
            _require_int(self, name, minimum=0)
        _require_float(self, "lr", positive=True)
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _require_float(self, name, positive=False)
        for name in ("beta1", "beta2", "val_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"TrainConfig.{name} must be in (0, 1), got {value!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr} must not exceed lr={self.lr}")
        _require_choice(self, "tokenizer", ("byte", "bpe"))
        _require_choice(self, "precision", ("fp32", "bf16"))
        _require_choice(self, "on_nonfinite", ("stop", "skip"))
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"TrainConfig.expert_parallel must be a bool, got {self.expert_parallel!r}")
        if self.placement_interval and not self.expert_parallel:
            raise ValueError("TrainConfig.placement_interval needs expert_parallel=True")
        _check_device(self.device)
        if not isinstance(self.omoe, bool):
            raise ValueError(f"TrainConfig.omoe must be a bool, got {self.omoe!r}")
        self.omoe_config()
        if self.data is not None and not isinstance(self.data, str):
            raise ValueError(f"TrainConfig.data must be a path string or None, got {self.data!r}")

    def omoe_config(self):
        """The OMoEConfig of the omoe_* fields (their errors name the TrainConfig field)."""
        from ..optim.omoe import OMoEConfig

        try:
            return OMoEConfig(self.omoe_accumulate_steps, self.omoe_orthogonal_steps, self.omoe_alpha)
        except ValueError as err:
            raise ValueError(str(err).replace("OMoEConfig.", "TrainConfig.omoe_")) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_device(name) -> None:
    """``device`` is "auto", "cpu", "cuda" or "cuda:N" (availability is checked when the run starts)."""
    kind, _, index = name.partition(":") if isinstance(name, str) else ("", "", "")
    if name == "auto" or (kind in ("cpu", "cuda") and (not index or (index.isdigit() and kind == "cuda"))):
        return
    raise ValueError(f"TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


@dataclasses.dataclass
class Preset:
    description: str
    model: dict
    train: dict


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "CPU, ~2 minutes on 2 cores: 4 layers, d=128, 8 experts top-2, byte tokens",
        model=dict(seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff=256, num_experts=8, top_k=2),
        train=dict(steps=250, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=25, eval_every=50,
                   eval_batches=4, checkpoint_every=125, threads=1),
    ),
    "tiny-dense": Preset(
        "the tiny preset with one dense FFN per block: the start of --init-from-dense",
        model=dict(seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff=256, num_experts=1, top_k=1),
        train=dict(steps=250, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=25, eval_every=50,
                   eval_batches=4, checkpoint_every=125, threads=1),
    ),
    "small": Preset(
        "1 GPU: 8 layers, d=512, 16 experts top-2 of width 1024, BPE 8192, 1024-token context",
        model=dict(seq_len=1024, d_model=512, n_layers=8, n_heads=8, d_ff=1024, num_experts=16, top_k=2),
        train=dict(steps=5000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=200, eval_every=250,
                   eval_batches=16, checkpoint_every=500, tokenizer="bpe", bpe_vocab_size=8192,
                   precision="bf16"),
    ),
    "medium": Preset(
        "several GPUs (torchrun): 12 layers, d=768, 32 experts top-2 in every other block, BPE 16384",
        model=dict(seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=2048, num_experts=32, top_k=2,
                   moe_every=2),
        train=dict(steps=20000, batch_size=16, lr=6e-4, min_lr=6e-5, warmup_steps=1000, eval_every=500,
                   eval_batches=32, checkpoint_every=1000, tokenizer="bpe", bpe_vocab_size=16384,
                   precision="bf16"),
    ),
}
