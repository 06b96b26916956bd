"""A float64 reference MoE layer: a plain per-token, per-expert loop with no tricks.

It reads the parameters of a ``flexmoe.MoELayer`` and recomputes output and losses from scratch,
so autograd through it gives reference gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def activation(h, kind, cfg=None):
    if kind == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    if kind == "swiglu_clamped":  # GPT-OSS, on [gate | up] halves
        g, u = h.chunk(2, dim=-1)
        g = g.clamp(max=cfg.swiglu_limit)
        u = u.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
        return (u + 1) * g * torch.sigmoid(cfg.swiglu_alpha * g)
    return F.gelu(h) if kind == "gelu" else F.relu(h)


def exact_capacity(cfg, T):
    """ceil(cf * T * k / E) with cf read as the decimal it prints as (fractions, no floats)."""
    from fractions import Fraction

    value = Fraction(repr(float(cfg.capacity_factor))) * T * cfg.top_k / cfg.num_experts
    return math.ceil(value)


def limited_choice(select_t, cfg, group_stages):
    """One token's top-k: restrict to the best groups stage by stage, then the k best experts.

    group_stages: list of (groups as lists of member experts, number of groups kept[, parent]);
    an expert may be in several groups (a replicated expert is in every rank holding it). A group
    scores the sum of its ``group_score_experts`` best scores among the still-allowed experts
    (-inf if none, or if ``parent[g]`` — its node — was not kept by the previous stage); groups
    scoring -inf are never kept. Returns the chosen experts and the groups kept by the last stage.
    """
    E = len(select_t)
    allowed = set(range(E))
    kept = None
    for stage in group_stages:
        groups, keep = stage[0], stage[1]
        parent = stage[2] if len(stage) > 2 else None
        scored = []
        for g, members in enumerate(groups):
            vals = sorted((select_t[e] for e in members if e in allowed), reverse=True)
            score = sum(vals[: cfg.group_score_experts]) if vals else -math.inf
            if parent is not None and parent[g] not in kept:
                score = -math.inf
            scored.append((score, g))
        kept = {g for sc, g in sorted(scored, key=lambda sg: -sg[0])[:keep] if sc > -math.inf}
        allowed = {e for e in allowed if any(e in groups[g] for g in kept)}
    order = sorted(allowed, key=lambda e: -select_t[e])
    return order[: cfg.top_k], kept


def owner_groups(owner, num_groups=None):
    """Member lists from the group index of every expert."""
    n = max(owner) + 1 if num_groups is None else num_groups
    return [[e for e in range(len(owner)) if owner[e] == g] for g in range(n)]


def config_group_stages(cfg):
    stages = []
    if cfg.top_groups is not None:
        size = cfg.num_experts // cfg.num_groups
        stages.append((owner_groups([e // size for e in range(cfg.num_experts)]), cfg.top_groups))
    return stages


def reference_routing(x_TD, router_weight, cfg, expert_bias=None, router_bias=None, device_stages=(), noise=None):
    """Top-k choice, weights, kept pairs (capacity), all by explicit loops where it matters.

    Returns logits, probs, chosen, weights, keep and the unbiased choice (for the aux loss).
    noise: the router-input jitter factors (training mode), same shape as x_TD.
    """
    x_in = x_TD if noise is None else x_TD * noise
    logits = x_in @ router_weight.t()
    if router_bias is not None:
        logits = logits + router_bias
    probs = torch.softmax(logits, -1) if cfg.router == "softmax" else torch.sigmoid(logits)
    select = probs.detach() + (expert_bias if expert_bias is not None else 0)
    T, E = probs.shape
    stages = config_group_stages(cfg) + list(device_stages)
    chosen = [limited_choice([float(v) for v in select[t]], cfg, stages)[0] for t in range(T)]
    unbiased = [limited_choice([float(v) for v in probs[t].detach()], cfg, stages)[0] for t in range(T)]
    weights = []
    for t in range(T):
        w = torch.stack([probs[t, e] for e in chosen[t]])
        if cfg.norm_topk_prob:
            w = w / w.sum()
        weights.append(w * cfg.routed_scaling_factor)
    keep = [[True] * cfg.top_k for _ in range(T)]
    if cfg.capacity_factor is not None:
        cap = exact_capacity(cfg, T)
        for e in range(E):
            pairs = [(t, k) for t in range(T) for k in range(cfg.top_k) if chosen[t][k] == e]
            if cfg.capacity_priority == "prob":
                prio = lambda tk: -float(probs[tk[0], e].detach())  # noqa: E731
            elif cfg.capacity_priority == "weight":
                prio = lambda tk: -float(weights[tk[0]][tk[1]].detach())  # noqa: E731
            else:
                prio = lambda tk: 0.0  # noqa: E731
            pairs.sort(key=lambda tk: (prio(tk), tk[0] * cfg.top_k + tk[1]))
            for t, k in pairs[cap:]:
                keep[t][k] = False
    return logits, probs, chosen, weights, keep, unbiased


def switch_loss(probs, chosen, cfg):
    """E * sum_e f_e * P_e over the given tokens (P from scores normalised per token)."""
    T, E = probs.shape
    f = torch.zeros(E, dtype=torch.float64)
    for t in range(T):
        for e in chosen[t]:
            f[e] += 1.0 / (T * cfg.top_k)
    p = (probs / probs.sum(-1, keepdim=True)).mean(0)
    return E * (f * p).sum()


def reference_moe(layer, x, noise=None, device_stages=(), global_f=None):
    """Output, aux loss and per-expert counts of ``layer`` on ``x``, in float64.

    global_f: load fractions over all data-parallel ranks (for aux_loss_scope="global").
    """
    cfg = layer.config
    x_TD = x.reshape(-1, cfg.d_model).double()
    Wr = layer.router.weight.double()
    bias = layer.router.expert_bias.double()
    bias = bias if cfg.bias_update_rate or bool((bias != 0).any()) else None
    router_bias = layer.router.bias.double() if getattr(layer.router, "bias", None) is not None else None
    logits, probs, chosen, weights, keep, unbiased = reference_routing(
        x_TD, Wr, cfg, bias, router_bias, device_stages, None if noise is None else noise.double()
    )
    gu = layer.experts.gate_up_proj.double()
    dn = layer.experts.down_proj.double()
    gu_b = getattr(layer.experts, "gate_up_proj_bias", None)
    dn_b = getattr(layer.experts, "down_proj_bias", None)
    rows = []
    counts = [0] * cfg.num_experts
    for t in range(x_TD.shape[0]):
        y = torch.zeros(cfg.d_model, dtype=torch.float64)
        for k, e in enumerate(chosen[t]):
            if not keep[t][k]:
                continue
            counts[e] += 1
            h = gu[e] @ x_TD[t]
            if gu_b is not None:
                h = h + gu_b[e].double()
            out = dn[e] @ activation(h, cfg.activation, cfg)
            if dn_b is not None:
                out = out + dn_b[e].double()
            y = y + weights[t][k] * out
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros((0, cfg.d_model))
    if layer.shared_experts is not None:
        se = layer.shared_experts
        h = x_TD @ se.gate_up_proj.double().t()
        ys = activation(h, cfg.activation, cfg) @ se.down_proj.double().t()
        if se.gate is not None:
            ys = torch.sigmoid(x_TD @ se.gate.weight.double().t()) * ys
        y_TD = y_TD + ys
    T, E = probs.shape
    counted = unbiased if cfg.aux_loss_experts == "unbiased" else chosen
    aux = x_TD.new_zeros(())
    if cfg.aux_loss_coef and T and cfg.aux_loss_scope == "batch":
        aux = aux + cfg.aux_loss_coef * switch_loss(probs, counted, cfg)
    if cfg.aux_loss_coef and T and cfg.aux_loss_scope == "sequence":
        S = x.shape[-2] if x.dim() >= 3 else T
        per_seq = [switch_loss(probs[b * S:(b + 1) * S], counted[b * S:(b + 1) * S], cfg) for b in range(T // S)]
        aux = aux + cfg.aux_loss_coef * torch.stack(per_seq).mean()
    if cfg.aux_loss_coef and T and cfg.aux_loss_scope == "global":
        p = (probs / probs.sum(-1, keepdim=True)).mean(0)
        aux = aux + cfg.aux_loss_coef * E * (global_f * p).sum()
    if cfg.z_loss_coef and T:
        aux = aux + cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    return y_TD.reshape(x.shape), aux, torch.tensor(counts), keep
