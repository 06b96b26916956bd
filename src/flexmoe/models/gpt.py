"""GPT-MoE: a decoder-only transformer whose feed-forward blocks are ``flexmoe.MoELayer``s.

Legend: B batch, S sequence, D model width, H heads, Dh head width, V vocabulary, F FFN width.
Blocks are pre-norm (RMSNorm) with causal self-attention (torch SDPA; RoPE or learned
positions) and a SwiGLU FFN that is an MoE layer in every ``moe_every``-th block, dense elsewhere.
``num_experts == 1`` gives a dense model with the same shapes (the start of expert-diversify).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DTSGateConfig, KernelChoice, MoEConfig, RouterKind, _require_choice, _require_float, _require_int
from ..experts import DenseFFN
from ..layer import MoELayer
from ..parallel import ParallelExperts
from ..parallel.checkpoint import slot_rows

Positions = Literal["rope", "learned"]


@dataclasses.dataclass
class ModelConfig:
    """Shape and routing of a GPT-MoE.

    vocab_size: tokenizer vocabulary. seq_len: longest context (positions).
    d_model, n_layers, n_heads: width, depth, attention heads (d_model % n_heads == 0).
    d_ff: hidden width of each expert and of the dense FFNs.
    num_experts, top_k: routed experts per MoE block and experts per token; 1 expert = dense model.
    moe_every: block i is MoE when ``(i + 1) % moe_every == 0`` (1: every block, 2: every other).
    router, aux_loss_coef, z_loss_coef, bias_update_rate, dts: as in ``flexmoe.MoEConfig``.
    positions: "rope" (rotary, theta ``rope_theta``) or "learned" absolute embeddings.
    tie_embeddings: share the input embedding with the output projection.
    """

    vocab_size: int = 257
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1
    router: RouterKind = "softmax"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    dts: DTSGateConfig = dataclasses.field(default_factory=DTSGateConfig)
    positions: Positions = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    kernels: KernelChoice = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff",
                     "num_experts", "top_k", "moe_every"):
            _require_int(self, name, minimum=1)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model} into even head widths"
            )
        _require_choice(self, "router", ("softmax", "sigmoid", "dts"))
        if self.is_moe and self.top_k > self.num_experts:
            raise ValueError(f"ModelConfig.top_k={self.top_k} must not exceed num_experts={self.num_experts}")
        _require_choice(self, "positions", ("rope", "learned"))
        for name in ("rope_theta", "norm_eps", "init_std"):
            _require_float(self, name, positive=True)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.is_moe:
            self.moe_config()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def is_moe_block(self, index: int) -> bool:
        return self.is_moe and (index + 1) % self.moe_every == 0

    @property
    def moe_block_indices(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_block(i)]

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every MoE block (raises ValueError on a bad routing setting)."""
        return MoEConfig(
            d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts, top_k=self.top_k,
            router=self.router, aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
            bias_update_rate=self.bias_update_rate, dts=self.dts, init_std=self.init_std,
            kernels=self.kernels, validate_inputs=False,
        )

    def dense_ffn_config(self) -> MoEConfig:
        """Config of a dense SwiGLU FFN of width d_ff (a MoEConfig with one shared expert)."""
        return MoEConfig(d_model=self.d_model, d_ff=self.d_ff, num_experts=1, top_k=1,
                         num_shared_experts=1, init_std=self.init_std)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["dts"] = DTSGateConfig(**data.get("dts", {}))
        return cls(**data)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [S, Dh/2] of rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle_SR = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angle_SR.cos().float(), angle_SR.sin().float()


def apply_rope(x_BHSK: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels by position angles."""
    x1, x2 = x_BHSK.chunk(2, dim=-1)
    cos = cos_SR.to(x_BHSK.dtype)
    sin = sin_SR.to(x_BHSK.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos_SR, sin_SR = rope[0][:S], rope[1][:S]
            q, k = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        y_BHSK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y_BHSK.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, ep_group=None, slots_per_rank: int | None = None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_block(index):
            moe_cfg = cfg.moe_config()
            if ep_group is None:
                self.ffn = MoELayer(moe_cfg)
            else:
                self.ffn = MoELayer(moe_cfg, ep_group=ep_group, slots_per_rank=slots_per_rank)
        else:
            self.ffn = DenseFFN(cfg.dense_ffn_config())

    def forward(self, x_BSD: torch.Tensor, rope) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rope)
        h_BSD = self.ffn_norm(x_BSD)
        return x_BSD + self.ffn(h_BSD)


class GPTMoE(nn.Module):
    """``logits = model(tokens)`` for int64 tokens [B, S]; router losses are collected with
    ``flexmoe.aux_loss(model)`` after the forward.

    ep_group, slots_per_rank: expert parallelism (``flexmoe.MoELayer(config, ep_group=...)``) for
        every MoE block; the initial weights are those of the one-process model with the same seed.
    """

    def __init__(self, cfg: ModelConfig, ep_group=None, slots_per_rank: int | None = None):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i, ep_group, slots_per_rank) for i in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 L)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        ep_stages = {f"{name}.": m for name, m in self.named_modules() if isinstance(m, ParallelExperts)}
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            is_out = name.endswith("attn.proj.weight") or name.endswith("down_proj")
            stage = ep_stages.get(name.rpartition(".")[0] + ".")
            if stage is None:
                nn.init.normal_(p, std=out_std if is_out else std)
                continue
            logical = torch.empty((stage.config.num_experts,) + tuple(p.shape[1:]), dtype=p.dtype)
            nn.init.normal_(logical, std=out_std if is_out else std)
            p.copy_(slot_rows(stage.placement, stage.rank, logical.to(p.device)))

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        B, S = tokens_BS.shape
        if S > self.config.seq_len:
            raise ValueError(f"sequence length {S} exceeds ModelConfig.seq_len={self.config.seq_len}")
        x_BSD = self.tok_emb(tokens_BS)
        if self.pos_emb is not None:
            x_BSD = x_BSD + self.pos_emb(torch.arange(S, device=tokens_BS.device))
        rope = (self.rope_cos, self.rope_sin) if self.config.positions == "rope" else None
        for block in self.blocks:
            x_BSD = block(x_BSD, rope)
        return self.lm_head(self.final_norm(x_BSD))

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token): active counts top_k of the routed experts."""
        cfg = self.config
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        inactive = 0
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                expert = block.ffn.experts.gate_up_proj[0].numel() + block.ffn.experts.down_proj[0].numel()
                inactive += (cfg.num_experts - cfg.top_k) * expert
        return total, total - inactive
