"""Triton grouped GEMMs of the expert stage with the gathers and activations fused in.

Legend: T tokens, K slots, N grouped rows, E experts, D model width, F expert hidden width,
H = 2F (gated) or F, Q row blocks, B rows per block, P programs.
A *row block* is up to B consecutive grouped rows of one expert; the table of row blocks
(``row_blocks``) is built on the device from the offsets, so no kernel needs a host sync and
every program has at most B rows to do whatever the routing skew.

- ``gate_up``: ``h = x[row_token] @ w_gu[e]^T`` with the gather in the operand load (no ``x_ND``)
  and ``a = act(h) * scale`` in the epilogue; writes ``h`` (for backward) and ``a``.
- ``expert_mm``: ``out = a @ w[e]`` with strides choosing ``w[e]`` or ``w[e]^T``.
- ``down_dgrad``: ``da = dy[row_token] @ w_down[e]`` with the gather in the load (no permuted
  gradient) and the activation backward (and the routing-weight gradient) in the epilogue.
- ``expert_wgrad``: ``dw[e] = g[rows of e]^T @ x[rows of e]``, either operand gathered; the grid
  walks (row block, output tile) items (one program per item, or persistent: a tuning choice), so
  a hot expert's rows are spread over many programs. An expert's only block writes ``dw[e]`` directly; the blocks of a split (hot)
  expert write float32 (float64) partials that a second kernel sums in a fixed order.
On CUDA each kernel is autotuned over a small tile set keyed on the shape; on CPU tensors (under
``TRITON_INTERPRET=1``) one small fixed tile runs. On sm90+ (``hopper_tma``) the weight tiles are
loaded through TMA descriptors of ``w`` viewed as ``[E * rows, cols]``: columns past the end are
zero-filled; rows that run into the next expert only meet masked outputs or zero operands.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host-side TMA descriptors: the pointer path only
    TensorDescriptor = None

ACTIVATION_CODES = {"swiglu": 0, "gelu": 1, "relu": 2}
_CPU_TILE = dict(BN=32, BK=32)
_CPU_ROWS = 32


# ---------------------------------------------------------------- schedule (torch, on device)


def row_block_size(num_rows: int, num_experts: int, device: torch.device) -> int:
    """Rows per block of the forward / dgrad GEMMs: 128, or 64 when experts are small."""
    if device.type != "cuda":
        return _CPU_ROWS
    return 128 if num_rows >= 128 * num_experts else 64


def expert_blocks(offsets_E: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first row, end row, blocks of ``block`` rows) of each expert, int64."""
    ends_E = offsets_E.to(torch.int64)
    starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    return starts_E, ends_E, (ends_E - starts_E + block - 1) // block


def row_blocks(offsets_E: torch.Tensor, num_rows: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of at most ``block`` rows of one expert: (expert_Q, first_row_Q, end_row_Q), int32.

    ``num_rows`` (the grouped buffer's length, known on the host) bounds the count:
    Q = num_rows // block + E + 1; unused blocks have ``first_row == end_row``.
    """
    return _row_blocks_and_used(offsets_E, num_rows, block)[0]


def _row_blocks_and_used(offsets_E: torch.Tensor, num_rows: int, block: int):
    """``row_blocks`` and the number of used blocks (they come first), int32 ``[1]`` on the device."""
    E = offsets_E.shape[0]
    starts_E, ends_E, blocks_E = expert_blocks(offsets_E, block)
    cum_E = torch.cumsum(blocks_E, 0)
    Q = num_rows // block + E + 1
    q_Q = torch.arange(Q, device=offsets_E.device)
    expert_Q = torch.searchsorted(cum_E, q_Q, right=True).clamp_max(E - 1)
    first_Q = starts_E[expert_Q] + (q_Q - (cum_E - blocks_E)[expert_Q]) * block
    used_Q = q_Q < cum_E[-1]
    end_Q = torch.where(used_Q, torch.minimum(first_Q + block, ends_E[expert_Q]), 0)
    first_Q = torch.where(used_Q, first_Q, 0)
    return (expert_Q.to(torch.int32), first_Q.to(torch.int32), end_Q.to(torch.int32)), cum_E[-1:].to(torch.int32)


# ---------------------------------------------------------------- device helpers


@triton.jit
def _act_fwd(g, u, ACT: tl.constexpr):
    """act(h) (ungated: g is h, u unused) or silu(g) * u."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g)) * u
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def _block_rows(block_expert_ptr, block_first_ptr, block_end_ptr, q, BM: tl.constexpr):
    expert = tl.load(block_expert_ptr + q).to(tl.int64)
    first = tl.load(block_first_ptr + q).to(tl.int64)
    end = tl.load(block_end_ptr + q).to(tl.int64)
    rows = first + tl.arange(0, BM)
    return expert, first, end, rows, rows < end


@triton.jit
def _source_rows(index_ptr, rows, row_ok, GATHER: tl.constexpr):
    """Rows of the operand to read: ``index[rows]`` (gathered) or ``rows``; -1 rows read zeros."""
    if GATHER:
        src = tl.load(index_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        return src, row_ok & (src >= 0)
    return rows, row_ok


@triton.jit
def _k_mask(k0, kk, K, EVEN_K: tl.constexpr):
    """Which of the depth indices ``k0 + kk`` are in range (all of them when ``K % BK == 0``)."""
    if EVEN_K:
        return tl.full(kk.shape, 1, tl.int1)
    return k0 + kk < K


# ---------------------------------------------------------------- kernels


@triton.jit
def _tile_of(tile, num_blocks, tiles_n, GROUP: tl.constexpr):
    """(row block, column tile) of tile number ``tile``: GROUP consecutive row blocks sweep all
    column tiles together, so their operand rows and the weight tiles they share stay in L2."""
    per_group = GROUP * tiles_n
    first_q = (tile // per_group) * GROUP
    size = tl.minimum(num_blocks - first_q, GROUP)
    return first_q + (tile % per_group) % size, (tile % per_group) // size


@triton.jit
def _gate_up_tile(
    q, pid_n, x_ptr, row_token_ptr, w_ptr, w_desc, scale_ptr, h_ptr, a_ptr,
    block_expert_ptr, block_first_ptr, block_end_ptr, D, F,
    GATED: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, x_desc, GATHER: tl.constexpr,
    WS: tl.constexpr, USED: tl.constexpr,
):
    """One (row block, column tile) of the gate_up GEMM (``USED``: the block is known to hold rows)."""
    expert, first, end, rows, row_ok = _block_rows(block_expert_ptr, block_first_ptr, block_end_ptr, q, BM)
    if USED or first < end:
        src, src_ok = _source_rows(row_token_ptr, rows, row_ok, GATHER)
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < F
        H = 2 * F if GATED else F
        kk = tl.arange(0, BK)
        x_ptrs = x_ptr + src[:, None] * D + kk[None, :]
        wg_ptrs = w_ptr + expert * H * D + cols[None, :] * D + kk[:, None]
        wu_ptrs = wg_ptrs + F * D
        row_w = (expert * H + pid_n * BN).to(tl.int32)
        acc_g = tl.zeros([BM, BN], dtype=ACC)
        acc_u = tl.zeros([BM, BN], dtype=ACC)
        for k0 in tl.range(0, D, BK, warp_specialize=WS):
            k_ok = _k_mask(k0, kk, D, EVEN_K)
            if x_desc is not None:
                x = x_desc.load([first.to(tl.int32), k0])
            else:
                x = tl.load(x_ptrs, mask=src_ok[:, None] & k_ok[None, :], other=0.0)
            if TMA:
                wg = tl.trans(w_desc.load([row_w, k0]))
            else:
                wg = tl.load(wg_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PREC)
            if GATED:
                if TMA:
                    wu = tl.trans(w_desc.load([row_w + F, k0]))
                else:
                    wu = tl.load(wu_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                acc_u = tl.dot(x, wu, acc_u, input_precision=PREC)
            x_ptrs += BK
            wg_ptrs += BK
            wu_ptrs += BK
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        a = _act_fwd(acc_g, acc_u, ACT) * scale[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        out_ty = h_ptr.dtype.element_ty
        tl.store(h_ptr + rows[:, None] * H + cols[None, :], acc_g.to(out_ty), mask=mask)
        if GATED:
            tl.store(h_ptr + rows[:, None] * H + F + cols[None, :], acc_u.to(out_ty), mask=mask)
        tl.store(a_ptr + rows[:, None] * F + cols[None, :], a.to(out_ty), mask=mask)


@triton.jit
def _gate_up_kernel(
    x_ptr, row_token_ptr, w_ptr, w_desc, scale_ptr, h_ptr, a_ptr,
    block_expert_ptr, block_first_ptr, block_end_ptr, NUM_BLOCKS,
    D, F,
    GATED: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr = 0, GROUP: tl.constexpr = 8,
    EVEN_K: tl.constexpr = False, x_desc=None, GATHER: tl.constexpr = True, WS: tl.constexpr = False,
    used_ptr=None, PER_SM: tl.constexpr = 0,
):
    """``h = x[row_token] @ w_gu[e]^T`` and ``a = act(h) * scale`` per (row block, column tile).

    ``x_desc`` (grouped rows only, ``GATHER`` False): the row tiles through a TMA descriptor of
    ``x`` (rows past the block's end only meet masked outputs; past the buffer they are
    zero-filled). ``PER_SM`` 0: one program per tile; else persistent: each program walks tiles
    ``pid, pid + P, ...`` of the used row blocks (``used_ptr``) in one flattened loop, so the next
    tile's loads are in flight during this tile's epilogue. ``WS``: warp-specialised loop."""
    tiles_n = tl.cdiv(F, BN)
    if PER_SM:
        used = tl.load(used_ptr)
        for tile in tl.range(tl.program_id(0), used * tiles_n, tl.num_programs(0), flatten=True, warp_specialize=WS):
            q, pid_n = _tile_of(tile, used, tiles_n, GROUP)
            _gate_up_tile(q, pid_n, x_ptr, row_token_ptr, w_ptr, w_desc, scale_ptr, h_ptr, a_ptr, block_expert_ptr,
                          block_first_ptr, block_end_ptr, D, F, GATED, ACT, BM, BN, BK, ACC, PREC, TMA, EVEN_K, x_desc,
                          GATHER, False, True)
    else:
        q, pid_n = _tile_of(tl.program_id(0), NUM_BLOCKS, tiles_n, GROUP)
        _gate_up_tile(q, pid_n, x_ptr, row_token_ptr, w_ptr, w_desc, scale_ptr, h_ptr, a_ptr, block_expert_ptr,
                      block_first_ptr, block_end_ptr, D, F, GATED, ACT, BM, BN, BK, ACC, PREC, TMA, EVEN_K, x_desc,
                      GATHER, WS, False)


@triton.jit
def _expert_mm_kernel(
    a_ptr, w_ptr, w_desc, out_ptr,
    block_expert_ptr, block_first_ptr, block_end_ptr, NUM_BLOCKS,
    KDIM, NOUT, stride_we, stride_wk, stride_wn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr = 0, GROUP: tl.constexpr = 8, EVEN_K: tl.constexpr = False, a_desc=None,
    WS: tl.constexpr = False,
):
    """``out[r] = a[r] @ W_e`` with ``W_e[k, n] = w[e, k * stride_wk + n * stride_wn]``.

    TMA 1: ``w_desc`` rows are (expert, n) (``w[e]^T`` use); TMA 2: they are (expert, k).
    ``a_desc``: the row tiles of ``a`` through a TMA descriptor."""
    q, pid_n = _tile_of(tl.program_id(0), NUM_BLOCKS, tl.cdiv(NOUT, BN), GROUP)
    expert, first, end, rows, row_ok = _block_rows(block_expert_ptr, block_first_ptr, block_end_ptr, q, BM)
    if first < end:
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < NOUT
        kk = tl.arange(0, BK)
        a_ptrs = a_ptr + rows[:, None] * KDIM + kk[None, :]
        w_ptrs = w_ptr + expert * stride_we + kk[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros([BM, BN], dtype=ACC)
        for k0 in tl.range(0, KDIM, BK, warp_specialize=WS):
            k_ok = _k_mask(k0, kk, KDIM, EVEN_K)
            if a_desc is not None:
                a = a_desc.load([first.to(tl.int32), k0])
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if TMA == 1:
                w = tl.trans(w_desc.load([(expert * NOUT + pid_n * BN).to(tl.int32), k0]))
            elif TMA == 2:
                w = w_desc.load([(expert * KDIM + k0).to(tl.int32), pid_n * BN])
            else:
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PREC)
            a_ptrs += BK
            w_ptrs += BK * stride_wk
        tl.store(out_ptr + rows[:, None] * NOUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_dgrad_tile(
    q, pid_n, dy_ptr, row_token_ptr, w_ptr, w_desc, h_ptr, scale_ptr, dh_ptr, dscale_part_ptr,
    block_expert_ptr, block_first_ptr, block_end_ptr, D, F, PARTS,
    GATED: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, dy_desc, GATHER: tl.constexpr,
    WS: tl.constexpr, USED: tl.constexpr, h_desc,
):
    """One (row block, column tile) of the down dgrad (``USED``: the block is known to hold rows;
    ``h_desc``: the epilogue's ``h`` tiles through a TMA descriptor)."""
    expert, first, end, rows, row_ok = _block_rows(block_expert_ptr, block_first_ptr, block_end_ptr, q, BM)
    if USED or first < end:
        src, src_ok = _source_rows(row_token_ptr, rows, row_ok, GATHER)
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < F
        kk = tl.arange(0, BK)
        dy_ptrs = dy_ptr + src[:, None] * D + kk[None, :]
        w_ptrs = w_ptr + expert * D * F + kk[:, None] * F + cols[None, :]
        da = tl.zeros([BM, BN], dtype=ACC)
        for k0 in tl.range(0, D, BK, warp_specialize=WS):
            k_ok = _k_mask(k0, kk, D, EVEN_K)
            if dy_desc is not None:
                dy = dy_desc.load([first.to(tl.int32), k0])
            else:
                dy = tl.load(dy_ptrs, mask=src_ok[:, None] & k_ok[None, :], other=0.0)
            if TMA:
                w = w_desc.load([(expert * D + k0).to(tl.int32), pid_n * BN])
            else:
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            da = tl.dot(dy, w, da, input_precision=PREC)
            dy_ptrs += BK
            w_ptrs += BK * F
        H = 2 * F if GATED else F
        mask = row_ok[:, None] & col_ok[None, :]
        if h_desc is not None:  # rows past the block's end read the next rows: masked below
            g = h_desc.load([first.to(tl.int32), pid_n * BN]).to(ACC)
        else:
            g = tl.load(h_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(ACC)
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        out_ty = dh_ptr.dtype.element_ty
        if GATED:
            if h_desc is not None:
                u = h_desc.load([first.to(tl.int32), F + pid_n * BN]).to(ACC)
            else:
                u = tl.load(h_ptr + rows[:, None] * H + F + cols[None, :], mask=mask, other=0.0).to(ACC)
            sig = 1.0 / (1.0 + tl.exp(-g))
            silu = g * sig
            act = silu * u
            dg = da * scale * u * sig * (1.0 + g * (1.0 - sig))
            tl.store(dh_ptr + rows[:, None] * H + cols[None, :], dg.to(out_ty), mask=mask)
            tl.store(dh_ptr + rows[:, None] * H + F + cols[None, :], (da * scale * silu).to(out_ty), mask=mask)
        else:
            act = _act_fwd(g, g, ACT)
            if ACT == 1:
                cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
                dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
            else:
                dact = tl.where(g > 0, 1.0, 0.0)
            tl.store(dh_ptr + rows[:, None] * H + cols[None, :], (da * scale * dact).to(out_ty), mask=mask)
        partial = tl.sum(tl.where(mask, act * da, 0.0), axis=1)
        tl.store(dscale_part_ptr + rows * PARTS + pid_n, partial, mask=row_ok)


@triton.jit
def _down_dgrad_kernel(
    dy_ptr, row_token_ptr, w_ptr, w_desc, h_ptr, scale_ptr, dh_ptr, dscale_part_ptr,
    block_expert_ptr, block_first_ptr, block_end_ptr, NUM_BLOCKS,
    D, F, PARTS,
    GATED: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr = 0, GROUP: tl.constexpr = 8,
    EVEN_K: tl.constexpr = False, dy_desc=None, GATHER: tl.constexpr = True, WS: tl.constexpr = False,
    used_ptr=None, PER_SM: tl.constexpr = 0, h_desc=None,
):
    """``da = dy[row_token] @ w_down[e]`` (``dy[rows]`` without ``GATHER``, through ``dy_desc``
    when given), then ``dh = d act`` and per-tile ``dscale`` partials (column ``pid_n`` of a
    ``[N, PARTS]`` buffer, PARTS >= the column tiles). ``PER_SM`` / ``WS``: as ``_gate_up_kernel``."""
    tiles_n = tl.cdiv(F, BN)
    if PER_SM:
        used = tl.load(used_ptr)
        for tile in tl.range(tl.program_id(0), used * tiles_n, tl.num_programs(0), flatten=True, warp_specialize=WS):
            q, pid_n = _tile_of(tile, used, tiles_n, GROUP)
            _down_dgrad_tile(q, pid_n, dy_ptr, row_token_ptr, w_ptr, w_desc, h_ptr, scale_ptr, dh_ptr, dscale_part_ptr,
                             block_expert_ptr, block_first_ptr, block_end_ptr, D, F, PARTS, GATED, ACT, BM, BN, BK, ACC,
                             PREC, TMA, EVEN_K, dy_desc, GATHER, False, True, h_desc)
    else:
        q, pid_n = _tile_of(tl.program_id(0), NUM_BLOCKS, tiles_n, GROUP)
        _down_dgrad_tile(q, pid_n, dy_ptr, row_token_ptr, w_ptr, w_desc, h_ptr, scale_ptr, dh_ptr, dscale_part_ptr,
                         block_expert_ptr, block_first_ptr, block_end_ptr, D, F, PARTS, GATED, ACT, BM, BN, BK, ACC,
                         PREC, TMA, EVEN_K, dy_desc, GATHER, WS, False, h_desc)


@triton.jit
def _expert_wgrad_kernel(
    g_ptr, g_index_ptr, x_ptr, x_index_ptr, dw_ptr, part_ptr,
    block_expert_ptr, block_first_ptr, block_end_ptr, block_slot_ptr,
    NUM_BLOCKS, O, I,
    GATHER_G: tl.constexpr, GATHER_X: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    PER_SM: tl.constexpr = 2,
):
    """``g[rows]^T @ x[rows]`` for every (row block, BM x BN tile of dw[e]) item.

    Persistent (P = PER_SM programs per SM; PER_SM 0: one program per item): program p takes
    items p, p + P, ...; items are block-major, so the programs
    working on one block at a time share its rows in cache. Each item walks its block BK rows
    at a time; the only block of an expert stores its tile in ``dw`` directly, the blocks of a
    split expert store theirs in their slot of ``part`` (summed by ``_wgrad_reduce_kernel``).
    """
    tiles_o = tl.cdiv(O, BM)
    tiles_i = tl.cdiv(I, BN)
    items = NUM_BLOCKS * tiles_o * tiles_i
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        q = item // (tiles_o * tiles_i)
        t = item % (tiles_o * tiles_i)
        expert = tl.load(block_expert_ptr + q).to(tl.int64)
        first = tl.load(block_first_ptr + q).to(tl.int64)
        end = tl.load(block_end_ptr + q).to(tl.int64)
        if first < end:
            outs = (t // tiles_i) * BM + tl.arange(0, BM)
            ins = (t % tiles_i) * BN + tl.arange(0, BN)
            out_ok = outs < O
            in_ok = ins < I
            acc = tl.zeros([BM, BN], dtype=ACC)
            kk = tl.arange(0, BK)
            g_ptrs = g_ptr + (first + kk)[None, :] * O + outs[:, None]  # advanced by BK rows (ungathered g)
            x_ptrs = x_ptr + (first + kk)[:, None] * I + ins[None, :]  # likewise for x
            for r0 in range(first, end, BK):
                rows = r0 + kk
                row_ok = rows < end
                if GATHER_G:
                    g_rows, g_ok = _source_rows(g_index_ptr, rows, row_ok, True)
                    g = tl.load(g_ptr + g_rows[None, :] * O + outs[:, None], mask=g_ok[None, :] & out_ok[:, None], other=0.0)
                else:
                    g = tl.load(g_ptrs, mask=row_ok[None, :] & out_ok[:, None], other=0.0)
                if GATHER_X:
                    x_rows, x_ok = _source_rows(x_index_ptr, rows, row_ok, True)
                    x = tl.load(x_ptr + x_rows[:, None] * I + ins[None, :], mask=x_ok[:, None] & in_ok[None, :], other=0.0)
                else:
                    x = tl.load(x_ptrs, mask=row_ok[:, None] & in_ok[None, :], other=0.0)
                acc = tl.dot(g, x, acc, input_precision=PREC)
                g_ptrs += BK * O
                x_ptrs += BK * I
            tile = outs[:, None] * I + ins[None, :]
            slot = tl.load(block_slot_ptr + q).to(tl.int64)
            if slot < 0:
                tl.store(dw_ptr + expert * O * I + tile, acc.to(dw_ptr.dtype.element_ty), mask=out_ok[:, None] & in_ok[None, :])
            else:
                tl.store(part_ptr + slot * O * I + tile, acc, mask=out_ok[:, None] & in_ok[None, :])


@triton.jit
def _wgrad_reduce_kernel(part_ptr, dw_ptr, blocks_ptr, slot_start_ptr, OI, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``dw[e] = sum of e's slots`` in slot order (deterministic) for experts with 0 or >= 2 blocks."""
    e = tl.program_id(1).to(tl.int64)
    n = tl.load(blocks_ptr + e)
    if n != 1:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < OI
        first = tl.load(slot_start_ptr + e).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for j in range(0, n):
            acc += tl.load(part_ptr + (first + j) * OI + offs, mask=ok, other=0.0)
        tl.store(dw_ptr + e * OI + offs, acc.to(dw_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers


def _set_descriptor_tiles(nargs: dict) -> None:
    """Autotune pre-hook: give the descriptors (if any) the tiles of the config being run."""
    desc = nargs.get("w_desc")
    if desc is not None:
        desc.block_shape = _weight_block(nargs["TMA"], nargs["BN"], nargs["BK"])
    for name in _ROW_DESCS:
        if nargs.get(name) is not None:
            nargs[name].block_shape = [nargs["BM"], nargs["BK"]]
    if nargs.get("h_desc") is not None:
        nargs["h_desc"].block_shape = [nargs["BM"], nargs["BN"]]


_ROW_DESCS = ("x_desc", "dy_desc", "a_desc")  # descriptors of grouped operand rows: [BM, BK] tiles


def _weight_block(mode: int, bn: int, bk: int) -> list[int]:
    return [bn, bk] if mode == 1 else [bk, bn]


def _config(num_warps: int, num_stages: int, **tile) -> triton.Config:
    return triton.Config(tile, num_warps=num_warps, num_stages=num_stages, pre_hook=_set_descriptor_tiles)


# Autotune sets (CUDA), the two fastest of ``benchmarks/kernels.py --sweep`` per kernel on an H200
# (2026-12-01; Qwen3-like, OLMoE-like and Mixtral-like shapes agree on them). BM is not tuned: it
# follows the rows per expert (``row_block_size``). Weight gradients: one program per item
# (PER_SM=0) beat the persistent grid (2 per SM) by up to 15%. dgrad, from the grouped-row sweep of
# 2026-12-02 (``--rows --sweep``, BENCHMARKS.md): 64-column tiles (fastest there) and the persistent
# grid (7-9% faster than one program per tile at 128 columns); the persistent gate_up took 30-31% longer.
CONFIGS = {
    "gate_up": [_config(8, 3, BN=128, BK=64), _config(8, 4, BN=128, BK=64)],
    "mm": [_config(8, 3, BN=256, BK=64), _config(8, 4, BN=256, BK=64)],
    "dgrad": [_config(8, 4, BN=128, BK=64), _config(8, 3, BN=128, BK=128), _config(8, 4, BN=64, BK=64),
              _config(8, 4, BN=128, BK=64, PER_SM=1)],
    "wgrad": [_config(8, 3, BM=128, BN=256, BK=64, PER_SM=0), _config(8, 3, BM=256, BN=128, BK=64, PER_SM=0)],
}
_DGRAD_MIN_BN = 64  # the routing-weight gradient has one partial per BN columns: sized for the narrowest
_CPU_WGRAD = dict(BM=32, BN=32, BK=16)
_KEYS = {
    "gate_up": ["D", "F", "GATED", "BM", "TMA", "GATHER", "WS"], "mm": ["NUM_BLOCKS", "KDIM", "NOUT", "BM", "TMA", "WS"],
    "dgrad": ["D", "F", "GATED", "BM", "TMA", "GATHER", "WS"], "wgrad": ["NUM_BLOCKS", "O", "I"],
}
_DEPTH = {"gate_up": "D", "mm": "KDIM", "dgrad": "D"}  # the GEMM depth of each kernel (EVEN_K when BK divides it)


def _with_even_k(name: str, kernel):
    if name not in _DEPTH:
        return kernel
    return triton.heuristics({"EVEN_K": lambda args: args[_DEPTH[name]] % args["BK"] == 0})(kernel)


_plain = {
    name: _with_even_k(name, kernel)
    for name, kernel in [("gate_up", _gate_up_kernel), ("mm", _expert_mm_kernel), ("dgrad", _down_dgrad_kernel),
                         ("wgrad", _expert_wgrad_kernel)]
}


def autotuned(name: str, configs: list[triton.Config], **autotune_kwargs):
    """Kernel ``name`` autotuned over ``configs`` (the benchmark's sweep builds wider sets this way)."""
    return triton.autotune(configs, key=_KEYS[name], **autotune_kwargs)(_plain[name])


_tuned = {name: autotuned(name, configs) for name, configs in CONFIGS.items()}


def _launch(name: str, device: torch.device, grid, *args, **constexprs) -> None:
    """Run kernel ``name``: autotuned on CUDA, with the fixed small CPU tile elsewhere."""
    if device.type == "cuda":
        _tuned[name][grid](*args, **constexprs)
    else:
        tile = _CPU_WGRAD if name == "wgrad" else _CPU_TILE
        weights = [a for a in args if TensorDescriptor is not None and isinstance(a, TensorDescriptor)]
        _set_descriptor_tiles({**constexprs, **tile, "w_desc": weights[0] if weights else None})
        _plain[name][grid](*args, **constexprs, **tile)


def _per_sm(per_sm: int | None) -> dict:
    """The persistent-grid choice to pass a launch: none (tuned on CUDA, 0 on CPU) or the given one."""
    return {} if per_sm is None else {"PER_SM": per_sm}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact products for float32 / float64 data (no TF32)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def hopper_tma(w_E: torch.Tensor) -> bool:
    """Whether the weight loads can use TMA descriptors: sm90+ CUDA, Triton's host descriptors,
    16-bit contiguous weights with 16-byte aligned rows."""
    return (
        TensorDescriptor is not None
        and w_E.is_cuda
        and torch.cuda.get_device_capability(w_E.device)[0] >= 9
        and w_E.dtype in (torch.bfloat16, torch.float16)
        and w_E.is_contiguous()
        and w_E.shape[-1] % 8 == 0
        and w_E.data_ptr() % 16 == 0
    )


def _weight_desc(w_E: torch.Tensor, mode: int):
    """A descriptor of ``w_E`` as ``[E * rows, cols]`` (tile set at launch), or None for mode 0."""
    if not mode:
        return None
    return TensorDescriptor.from_tensor(w_E.reshape(-1, w_E.shape[-1]), _weight_block(mode, 64, 64))


def _rows_desc(rows_NK: torch.Tensor, use: bool):
    """A descriptor of grouped operand rows ``[N, K]`` (tile set at launch), or None."""
    if not use:
        return None
    return TensorDescriptor.from_tensor(rows_NK, [64, 64])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class Schedule:
    """The row blocks of one grouped buffer (built once, used by every GEMM of a pass)."""

    def __init__(self, offsets_E: torch.Tensor, num_rows: int):
        self.num_rows = num_rows
        self.block = row_block_size(num_rows, offsets_E.shape[0], offsets_E.device)
        # used_1: how many row blocks hold rows, on the device: the persistent kernels' tile count.
        self.tables, self.used_1 = _row_blocks_and_used(offsets_E, num_rows, self.block)
        self.offsets_E = offsets_E

    @property
    def num_blocks(self) -> int:
        return self.tables[0].shape[0]

    def tile_grid(self, tiles_n: int, meta: dict, device: torch.device) -> tuple[int]:
        """One program per (row block, column tile), or ``PER_SM`` programs per SM (persistent;
        two on CPU tensors, so that each walks several tiles)."""
        tiles = self.num_blocks * tiles_n
        per_sm = meta.get("PER_SM", 0)
        if not per_sm:
            return (tiles,)
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 1
        return (max(1, min(per_sm * sms * (1 if device.type == "cuda" else 2), tiles)),)

    @functools.cached_property
    def wgrad(self) -> WgradSchedule:
        """Coarser blocks for the weight gradients: one per expert at even load (up to twice the
        mean rows), so only hot experts are split."""
        E = self.offsets_E.shape[0]
        chunk = 16 if self.offsets_E.device.type != "cuda" else max(256, triton.cdiv(2 * self.num_rows, E * 64) * 64)
        return WgradSchedule(self.offsets_E, self.num_rows, chunk)


class WgradSchedule:
    """Row blocks of at most ``chunk`` rows for the weight gradients, and the scratch slots of the
    blocks of split experts (``slot_Q`` -1 for an expert's only block).

    A split expert has more than ``chunk`` rows and at most ``2 * rows / chunk`` blocks, so
    ``2 * num_rows // chunk`` slots always suffice.
    """

    def __init__(self, offsets_E: torch.Tensor, num_rows: int, chunk: int):
        self.tables = row_blocks(offsets_E, num_rows, chunk)
        expert_Q, first_Q, end_Q = self.tables
        starts_E, _, blocks_E = expert_blocks(offsets_E, chunk)
        slots_E = torch.where(blocks_E > 1, blocks_E, 0)
        slot_start_E = torch.cumsum(slots_E, 0) - slots_E
        e_Q = expert_Q.to(torch.int64)
        within_Q = (first_Q.to(torch.int64) - starts_E[e_Q]) // chunk
        split_Q = (blocks_E[e_Q] > 1) & (end_Q > first_Q)
        self.slot_Q = torch.where(split_Q, slot_start_E[e_Q] + within_Q, -1).to(torch.int32)
        self.blocks_E = blocks_E.to(torch.int32)
        self.slot_start_E = slot_start_E.to(torch.int32)
        self.num_slots = max(1, 2 * num_rows // chunk)

    @property
    def num_blocks(self) -> int:
        return self.tables[0].shape[0]


def gate_up(x_TD, row_token_N, w_EHD, scale_N, schedule: Schedule, activation: str, tma: bool | None = None,
            ws: bool = False, per_sm: int | None = None):
    """``(h_NH, a_NF)``: the gate_up GEMM on gathered token rows and the scaled activation.

    ``row_token_N`` None: ``x_TD`` holds the grouped rows already (``x_ND``; their tiles go
    through TMA too where the weights' do). ``tma``: weight tiles through TMA descriptors (None:
    where ``hopper_tma`` allows). ``ws``: warp-specialised loop (Triton on sm90+). ``per_sm``: the
    persistent grid's programs per SM (0: one program per tile; None: tuned on CUDA, 0 on CPU)."""
    N, (E, H, D) = schedule.num_rows, w_EHD.shape
    gated = activation == "swiglu"
    F = H // 2 if gated else H
    h_NH = x_TD.new_empty((N, H))
    a_NF = x_TD.new_empty((N, F))
    if N and F and x_TD.shape[0]:
        grid = lambda meta: schedule.tile_grid(triton.cdiv(F, meta["BN"]), meta, x_TD.device)  # noqa: E731
        mode = int(hopper_tma(w_EHD) if tma is None else tma)
        gather = row_token_N is not None
        _launch("gate_up", x_TD.device, grid, x_TD, row_token_N if gather else schedule.tables[0], w_EHD,
                _weight_desc(w_EHD, mode), scale_N, h_NH, a_NF, *schedule.tables, schedule.num_blocks, D, F,
                GATED=gated, ACT=ACTIVATION_CODES[activation], BM=schedule.block, ACC=_acc(x_TD.dtype),
                PREC=_prec(x_TD.dtype), TMA=mode, x_desc=_rows_desc(x_TD, bool(mode) and not gather), GATHER=gather,
                WS=ws, used_ptr=schedule.used_1, **_per_sm(per_sm))
    return h_NH, a_NF


def expert_mm(a_NK: torch.Tensor, w_E: torch.Tensor, transpose: bool, schedule: Schedule, tma: bool | None = None,
              rows_tma: bool = False, ws: bool = False) -> torch.Tensor:
    """``out[r] = a[r] @ w[e]^T`` (transpose) or ``a[r] @ w[e]`` for the expert e owning row r.

    ``rows_tma``: the row tiles of ``a`` through a TMA descriptor too (with TMA weights)."""
    K = a_NK.shape[1]
    n_out = w_E.shape[1] if transpose else w_E.shape[2]
    out = a_NK.new_empty((a_NK.shape[0], n_out))
    stride_k, stride_n = (w_E.stride(2), w_E.stride(1)) if transpose else (w_E.stride(1), w_E.stride(2))
    if schedule.num_rows and n_out and K:
        grid = lambda meta: (schedule.num_blocks * triton.cdiv(n_out, meta["BN"]),)  # noqa: E731
        mode = (1 if transpose else 2) if (hopper_tma(w_E) if tma is None else tma) else 0
        _launch("mm", a_NK.device, grid, a_NK, w_E, _weight_desc(w_E, mode), out, *schedule.tables, schedule.num_blocks, K,
                n_out, w_E.stride(0), stride_k, stride_n, BM=schedule.block, ACC=_acc(a_NK.dtype), PREC=_prec(a_NK.dtype),
                TMA=mode, a_desc=_rows_desc(a_NK, bool(mode) and rows_tma), WS=ws)
    elif K == 0:
        out.zero_()
    return out


def down_dgrad(dy_TD, row_token_N, w_EDF, h_NH, scale_N, schedule: Schedule, activation: str, tma: bool | None = None,
               ws: bool = False, per_sm: int | None = None, h_tma: bool = False):
    """``(dh_NH, dscale_N)`` from the token-order output gradient, gathered on load
    (``row_token_N`` None: ``dy_TD`` holds the grouped rows, through TMA with TMA weights).

    ``tma`` None means pointer loads: TMA weight loads measured 9-21% slower here on an H200.
    ``ws``, ``per_sm``: as ``gate_up``. ``h_tma``: the epilogue reads ``h`` through a TMA descriptor
    (``h`` 16-bit on sm90+, or CPU tensors under the interpreter)."""
    N, (E, D, F) = schedule.num_rows, w_EDF.shape
    gated = activation == "swiglu"
    dh_NH = torch.empty_like(h_NH)
    if not (N and F and dy_TD.shape[0]):
        return dh_NH.zero_(), torch.zeros_like(scale_N)
    parts = triton.cdiv(F, _DGRAD_MIN_BN if dy_TD.device.type == "cuda" else _CPU_TILE["BN"])
    part_NP = torch.zeros((N, parts), dtype=_acc_torch(dy_TD.dtype), device=dy_TD.device)
    grid = lambda meta: schedule.tile_grid(triton.cdiv(F, meta["BN"]), meta, dy_TD.device)  # noqa: E731
    mode = 2 if tma else 0
    gather = row_token_N is not None
    _launch("dgrad", dy_TD.device, grid, dy_TD, row_token_N if gather else schedule.tables[0], w_EDF,
            _weight_desc(w_EDF, mode), h_NH, scale_N, dh_NH, part_NP, *schedule.tables, schedule.num_blocks, D, F, parts,
            GATED=gated, ACT=ACTIVATION_CODES[activation], BM=schedule.block, ACC=_acc(dy_TD.dtype),
            PREC=_prec(dy_TD.dtype), TMA=mode, dy_desc=_rows_desc(dy_TD, bool(mode) and not gather), GATHER=gather, WS=ws,
            used_ptr=schedule.used_1, **_per_sm(per_sm), h_desc=_rows_desc(h_NH, h_tma))
    return dh_NH, part_NP.sum(1).to(scale_N.dtype)


def expert_wgrad(g_M, g_index, x_M, x_index, num_experts: int, schedule: Schedule) -> torch.Tensor:
    """``dw[e] = g[rows of e]^T @ x[rows of e]`` (``[E, O, I]``), g / x rows gathered by index or not.

    Deterministic: split experts' blocks are summed in a fixed order in float32 (float64).
    """
    O, I = g_M.shape[1], x_M.shape[1]
    if not (schedule.num_rows and O and I and g_M.shape[0] and x_M.shape[0]):
        return g_M.new_zeros((num_experts, O, I))
    device = g_M.device
    ws = schedule.wgrad
    dw_EOI = g_M.new_empty((num_experts, O, I))
    part_SOI = torch.empty((ws.num_slots, O, I), dtype=_acc_torch(g_M.dtype), device=device)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 0

    def grid(meta):
        items = ws.num_blocks * triton.cdiv(O, meta["BM"]) * triton.cdiv(I, meta["BN"])
        per_sm = meta.get("PER_SM", 2)
        return (max(1, min(per_sm * sms, items) if sms and per_sm else items),)

    dummy = ws.slot_Q
    _launch("wgrad", device, grid, g_M, g_index if g_index is not None else dummy, x_M,
            x_index if x_index is not None else dummy, dw_EOI, part_SOI, *ws.tables, ws.slot_Q, ws.num_blocks, O, I,
            GATHER_G=g_index is not None, GATHER_X=x_index is not None, ACC=_acc(g_M.dtype), PREC=_prec(g_M.dtype))
    block = 4096 if device.type == "cuda" else 256
    _wgrad_reduce_kernel[(triton.cdiv(O * I, block), num_experts)](
        part_SOI, dw_EOI, ws.blocks_E, ws.slot_start_E, O * I, BLOCK=block, ACC=_acc(g_M.dtype))
    return dw_EOI
