"""A float64 reference MoE layer: a plain per-token, per-expert loop with no tricks.

It reads the parameters of a ``flexmoe.MoELayer`` and recomputes output and losses from scratch,
so autograd through it gives reference gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def activation(h, kind):
    if kind == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    return F.gelu(h) if kind == "gelu" else F.relu(h)


def reference_routing(x_TD, router_weight, cfg, expert_bias=None):
    """Top-k choice, weights, kept pairs (capacity), all by explicit loops where it matters."""
    logits = x_TD @ router_weight.t()
    probs = torch.softmax(logits, -1) if cfg.router == "softmax" else torch.sigmoid(logits)
    select = probs.detach() + (expert_bias if expert_bias is not None else 0)
    T, E = probs.shape
    chosen = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(select[t, e].detach()))
        chosen.append(order[: cfg.top_k])
    weights = []
    for t in range(T):
        w = torch.stack([probs[t, e] for e in chosen[t]])
        if cfg.norm_topk_prob:
            w = w / w.sum()
        weights.append(w)
    keep = [[True] * cfg.top_k for _ in range(T)]
    if cfg.capacity_factor is not None:
        cap = math.ceil(cfg.capacity_factor * T * cfg.top_k / E)
        for e in range(E):
            pairs = [(t, k) for t in range(T) for k in range(cfg.top_k) if chosen[t][k] == e]
            pairs.sort(key=lambda tk: (-float(probs[tk[0], e].detach()), tk[0] * cfg.top_k + tk[1]))
            for t, k in pairs[cap:]:
                keep[t][k] = False
    return logits, probs, chosen, weights, keep


def reference_moe(layer, x):
    """Output, aux loss and per-expert counts of ``layer`` on ``x``, in float64."""
    cfg = layer.config
    x_TD = x.reshape(-1, cfg.d_model).double()
    Wr = layer.router.weight.double()
    bias = layer.router.expert_bias.double() if cfg.bias_update_rate else None
    logits, probs, chosen, weights, keep = reference_routing(x_TD, Wr, cfg, bias)
    gu = layer.experts.gate_up_proj.double()
    dn = layer.experts.down_proj.double()
    rows = []
    counts = [0] * cfg.num_experts
    for t in range(x_TD.shape[0]):
        y = torch.zeros(cfg.d_model, dtype=torch.float64)
        for k, e in enumerate(chosen[t]):
            if not keep[t][k]:
                continue
            counts[e] += 1
            h = gu[e] @ x_TD[t]
            y = y + weights[t][k] * (dn[e] @ activation(h, cfg.activation))
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros((0, cfg.d_model))
    if layer.shared_experts is not None:
        se = layer.shared_experts
        h = x_TD @ se.gate_up_proj.double().t()
        ys = activation(h, cfg.activation) @ se.down_proj.double().t()
        if se.gate is not None:
            ys = torch.sigmoid(x_TD @ se.gate.weight.double().t()) * ys
        y_TD = y_TD + ys
    T, E = probs.shape
    aux = x_TD.new_zeros(())
    if cfg.aux_loss_coef and T:
        f = torch.zeros(E, dtype=torch.float64)
        for t in range(T):
            for e in chosen[t]:
                f[e] += 1.0 / (T * cfg.top_k)
        p = (probs / probs.sum(-1, keepdim=True)).mean(0)
        aux = aux + cfg.aux_loss_coef * E * (f * p).sum()
    if cfg.z_loss_coef and T:
        aux = aux + cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    return y_TD.reshape(x.shape), aux, torch.tensor(counts), keep
