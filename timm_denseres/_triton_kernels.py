"""The gate's CUDA kernels, in Triton: the same interface as the CPU kernels of ``_kernels.py``.

- the mix: ``act(v * y + sum_k w_k * a_k)`` and its mean over H, W in one pass over the maps, and its backward in
  one pass (every input's gradient, the reductions for v and w included);
- the mixing weights: ``v = sigmoid(s * l_v)`` and ``w = softmax(s * l_w)`` over the inbounds (padding left out)
  from fc2's output, forward and backward in one launch each. The rest of the head (the mean of y, fc1, the
  BatchNorm, fc2) is a handful of small PyTorch operations.

float32, bfloat16 or float16 maps (computed in float32), NCHW or channels_last, inbounds as wide as y or narrower (the zero padding
is implied), up to ``MAX_INBOUNDS`` inbounds. Under Triton's interpreter (``TRITON_INTERPRET=1``) the same kernels
run on CPU tensors, which is how they are tested without a GPU. Imported only where a gate takes this path
(``timm_denseres.gate``): a CPU-only PyTorch has no Triton.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ['MAX_INBOUNDS', 'covers', 'takes_gate', 'run_gate', 'self_check', 'launches', 'launching']

MAX_INBOUNDS = 8  # the kernels' inbound slots
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
launches = [0]  # kernel launches so far in this process (the operation counts of tools/benchmark.py read it)
launching = [False]  # True during a launch


# Reductions through tl.reduce with combine functions of this module: triton.language's own tl.sum and tl.max are
# jit functions made when triton is imported, which the interpreter cannot call if that was before
# TRITON_INTERPRET=1 was set (as in a test run)
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum(x, axis):
    return tl.reduce(x, axis, _add)


@triton.jit
def _max(x, axis):
    return tl.reduce(x, axis, _larger)


@triton.jit
def _offsets(b, c, hw, channels, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a (BLOCK_C, BLOCK_HW) tile of sample b in a map with ``channels`` channels."""
    if CHANNELS_LAST:
        return b * HW * channels + hw[None, :] * channels + c[:, None]
    else:
        return b * channels * HW + c[:, None] * HW + hw[None, :]


@triton.jit
def _tile(A, channels, b, c, hw, mask_hw, HW, CHANNELS_LAST: tl.constexpr):
    """An inbound's tile in float32 (zero where it has no such channel) and its offsets and mask."""
    offs = _offsets(b, c, hw, channels, HW, CHANNELS_LAST)
    mask = (c[:, None] < channels) & mask_hw[None, :]
    return tl.load(A + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def _row(P, b, k, rows, C, c, mask_c):
    """Row k of sample b of a (B, rows, C) tensor, in float32."""
    return tl.load(P + (b * rows + k) * C + c, mask=mask_c, other=0.0).to(tl.float32)


@triton.jit
def _column(P, row_stride, b, k, C, c, mask_c, scale):
    """Row k of sample b of a (B, rows, C) tensor (row_stride = rows * C) as a (BLOCK_C, 1) float32 column."""
    return (tl.load(P + b * row_stride + k * C + c, mask=mask_c, other=0.0).to(tl.float32) * scale)[:, None]


@triton.jit
def _columns(P, row_stride, b, first, C, c, mask_c, scale, N: tl.constexpr):
    """Rows first .. first + N - 1 (N <= 8) of sample b as columns (:func:`_column`), zeros in the slots past N."""
    r0 = _column(P, row_stride, b, first, C, c, mask_c, scale)
    r1 = r0 * 0.0
    r2 = r1
    r3 = r1
    r4 = r1
    r5 = r1
    r6 = r1
    r7 = r1
    if N > 1:
        r1 = _column(P, row_stride, b, first + 1, C, c, mask_c, scale)
    if N > 2:
        r2 = _column(P, row_stride, b, first + 2, C, c, mask_c, scale)
    if N > 3:
        r3 = _column(P, row_stride, b, first + 3, C, c, mask_c, scale)
    if N > 4:
        r4 = _column(P, row_stride, b, first + 4, C, c, mask_c, scale)
    if N > 5:
        r5 = _column(P, row_stride, b, first + 5, C, c, mask_c, scale)
    if N > 6:
        r6 = _column(P, row_stride, b, first + 6, C, c, mask_c, scale)
    if N > 7:
        r7 = _column(P, row_stride, b, first + 7, C, c, mask_c, scale)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _mix_fwd_kernel(Y, V, W, OUT, OUT_MEAN,
                    A0, A1, A2, A3, A4, A5, A6, A7, C0, C1, C2, C3, C4, C5, C6, C7,
                    C, HW, inv_hw, N_IN: tl.constexpr, RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    v = _column(V, C, b, 0, C, c, mask_c, 1.0)
    w0, w1, w2, w3, w4, w5, w6, w7 = _columns(W, N_IN * C, b, 0, C, c, mask_c, 1.0, N_IN)
    total = tl.full([BLOCK_C], 0.0, tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask_hw = hw < HW
        y, offs, mask = _tile(Y, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)
        out = v * y + w0 * _tile(A0, C0, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 1:
            out += w1 * _tile(A1, C1, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 2:
            out += w2 * _tile(A2, C2, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 3:
            out += w3 * _tile(A3, C3, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 4:
            out += w4 * _tile(A4, C4, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 5:
            out += w5 * _tile(A5, C5, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 6:
            out += w6 * _tile(A6, C6, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 7:
            out += w7 * _tile(A7, C7, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if RELU:
            out = tl.maximum(out, 0.0)
        out = out.to(OUT.dtype.element_ty)
        tl.store(OUT + offs, out, mask=mask)
        total += _sum(tl.where(mask, out.to(tl.float32), 0.0), axis=1)
    tl.store(OUT_MEAN + b * C + c, (total * inv_hw).to(OUT_MEAN.dtype.element_ty), mask=mask_c)


@triton.jit
def _inbound_grad(g, A, GA, channels, w, grad_mean, b, c, hw, mask_hw, HW, REDUCE: tl.constexpr,
                  WRITE: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """WRITE: stores an inbound's gradient ``g * w`` plus its mean's (its own channels); REDUCE: returns its share
    of w's."""
    offs = _offsets(b, c, hw, channels, HW, CHANNELS_LAST)
    mask = (c[:, None] < channels) & mask_hw[None, :]
    if WRITE:
        tl.store(GA + offs, (g * w + grad_mean).to(GA.dtype.element_ty), mask=mask)
    share = tl.full([g.shape[0]], 0.0, tl.float32)
    if REDUCE:
        share = _sum(g * tl.load(A + offs, mask=mask, other=0.0).to(tl.float32), axis=1)
    return share


@triton.jit
def _mix_bwd_kernel(G, GM, OUT, Y, V, W, GY, GYM, GV, GW,
                    A0, A1, A2, A3, A4, A5, A6, A7, GA0, GA1, GA2, GA3, GA4, GA5, GA6, GA7,
                    C0, C1, C2, C3, C4, C5, C6, C7,
                    C, HW, inv_hw, gym_stride, HAS_GM: tl.constexpr, HAS_GYM: tl.constexpr, N_IN: tl.constexpr,
                    RELU: tl.constexpr, REDUCE: tl.constexpr, WRITE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The mix's backward, g = act'(out) * (grad + grad_mean / HW). REDUCE: v's and w's gradients (sums over H, W
    of g * y and g * a_k); WRITE: y's gradient g * v and each inbound's g * w_k, each plus (HAS_GYM) the gradient of
    its mean over H, W, spread over H, W (row GYM of the gate's input gradient: y's mean, then the inbounds'). Both
    in one pass, or in two (the gate's node needs v's and w's first)."""
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    v = _column(V, C, b, 0, C, c, mask_c, 1.0)
    grad_mean = tl.full([BLOCK_C, 1], 0.0, tl.float32)
    if HAS_GM:  # the output mean's gradient, spread over H, W
        grad_mean = _column(GM, C, b, 0, C, c, mask_c, inv_hw)
    gm_y = tl.full([BLOCK_C, 1], 0.0, tl.float32)
    gm0, gm1, gm2, gm3, gm4, gm5, gm6, gm7 = gm_y, gm_y, gm_y, gm_y, gm_y, gm_y, gm_y, gm_y
    if HAS_GYM:
        gm_y = _columns(GYM, gym_stride, b, 0, C, c, mask_c, inv_hw, 1)[0]
        gm0, gm1, gm2, gm3, gm4, gm5, gm6, gm7 = _columns(GYM, gym_stride, b, 1, C, c, mask_c, inv_hw, N_IN)
    w0, w1, w2, w3, w4, w5, w6, w7 = _columns(W, N_IN * C, b, 0, C, c, mask_c, 1.0, N_IN)
    grad_v = tl.full([BLOCK_C], 0.0, tl.float32)
    gw0 = tl.full([BLOCK_C], 0.0, tl.float32)
    gw1 = gw0
    gw2 = gw0
    gw3 = gw0
    gw4 = gw0
    gw5 = gw0
    gw6 = gw0
    gw7 = gw0
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask_hw = hw < HW
        g, offs, mask = _tile(G, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)
        g = g + grad_mean
        if RELU:
            out = _tile(OUT, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
            g = tl.where(out > 0.0, g, 0.0)
        g = tl.where(mask, g, 0.0)
        if REDUCE:
            grad_v += _sum(g * _tile(Y, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0], axis=1)
        if WRITE:
            tl.store(GY + offs, (g * v + gm_y).to(GY.dtype.element_ty), mask=mask)
        gw0 += _inbound_grad(g, A0, GA0, C0, w0, gm0, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 1:
            gw1 += _inbound_grad(g, A1, GA1, C1, w1, gm1, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 2:
            gw2 += _inbound_grad(g, A2, GA2, C2, w2, gm2, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 3:
            gw3 += _inbound_grad(g, A3, GA3, C3, w3, gm3, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 4:
            gw4 += _inbound_grad(g, A4, GA4, C4, w4, gm4, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 5:
            gw5 += _inbound_grad(g, A5, GA5, C5, w5, gm5, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 6:
            gw6 += _inbound_grad(g, A6, GA6, C6, w6, gm6, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
        if N_IN > 7:
            gw7 += _inbound_grad(g, A7, GA7, C7, w7, gm7, b, c, hw, mask_hw, HW, REDUCE, WRITE,
                                 CHANNELS_LAST)
    if REDUCE:
        tl.store(GV + b * C + c, grad_v, mask=mask_c)
        tl.store(GW + (b * N_IN + 0) * C + c, gw0, mask=mask_c)
        if N_IN > 1:
            tl.store(GW + (b * N_IN + 1) * C + c, gw1, mask=mask_c)
        if N_IN > 2:
            tl.store(GW + (b * N_IN + 2) * C + c, gw2, mask=mask_c)
        if N_IN > 3:
            tl.store(GW + (b * N_IN + 3) * C + c, gw3, mask=mask_c)
        if N_IN > 4:
            tl.store(GW + (b * N_IN + 4) * C + c, gw4, mask=mask_c)
        if N_IN > 5:
            tl.store(GW + (b * N_IN + 5) * C + c, gw5, mask=mask_c)
        if N_IN > 6:
            tl.store(GW + (b * N_IN + 6) * C + c, gw6, mask=mask_c)
        if N_IN > 7:
            tl.store(GW + (b * N_IN + 7) * C + c, gw7, mask=mask_c)


@triton.jit
def _pool_kernel(Y, G, M0, M1, M2, M3, M4, M5, M6, M7, C, HW, inv_hw, N_IN: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The gate's input g = [mean of y over H, W, the inbounds' means] (B, (n + 1) * C), float32."""
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    total = tl.full([BLOCK_C], 0.0, tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        total += _sum(_tile(Y, C, b, c, hw, hw < HW, HW, CHANNELS_LAST)[0], axis=1)
    row = G + b * (N_IN + 1) * C + c
    tl.store(row, total * inv_hw, mask=mask_c)
    tl.store(row + C, _row(M0, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 1:
        tl.store(row + 2 * C, _row(M1, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 2:
        tl.store(row + 3 * C, _row(M2, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 3:
        tl.store(row + 4 * C, _row(M3, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 4:
        tl.store(row + 5 * C, _row(M4, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 5:
        tl.store(row + 6 * C, _row(M5, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 6:
        tl.store(row + 7 * C, _row(M6, b, 0, 1, C, c, mask_c), mask=mask_c)
    if N_IN > 7:
        tl.store(row + 8 * C, _row(M7, b, 0, 1, C, c, mask_c), mask=mask_c)


@triton.jit
def _weights_tile(L, VALID, b, c, mask_c, C, scale, N_IN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets, mask and scaled logits of the inbounds' weights, a (BLOCK_N, BLOCK_C) tile; padding is -inf."""
    k = tl.arange(0, BLOCK_N)
    valid = tl.load(VALID + k, mask=k < N_IN, other=0)
    rows = (k[:, None] < N_IN) & mask_c[None, :]
    real = rows & (c[None, :] < valid[:, None])
    logits = tl.load(L + b * (N_IN + 1) * C + (k[:, None] + 1) * C + c[None, :], mask=real, other=0.0)
    return rows, real, tl.where(real, logits.to(tl.float32) * scale, float('-inf'))


@triton.jit
def _weights_fwd_kernel(L, VALID, V, W, C, scale, N_IN: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    v_logit = tl.load(L + b * (N_IN + 1) * C + c, mask=mask_c, other=0.0).to(tl.float32) * scale
    tl.store(V + b * C + c, 1.0 / (1.0 + tl.exp(-v_logit)), mask=mask_c)
    rows, real, z = _weights_tile(L, VALID, b, c, mask_c, C, scale, N_IN, BLOCK_N)
    top = _max(z, axis=0)
    top = tl.where(top == float('-inf'), 0.0, top)  # only the tile's columns past C
    e = tl.where(real, tl.exp(z - top[None, :]), 0.0)
    total = _sum(e, axis=0)
    total = tl.where(total > 0.0, total, 1.0)
    k = tl.arange(0, BLOCK_N)
    tl.store(W + (b * N_IN + k[:, None]) * C + c[None, :], e / total[None, :], mask=rows)


@triton.jit
def _weights_bwd_kernel(GV, GW, V, W, GL, C, scale, HAS_GV: tl.constexpr, HAS_GW: tl.constexpr,
                        N_IN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    grad_v_logit = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_GV:
        v = tl.load(V + b * C + c, mask=mask_c, other=0.0)
        grad_v_logit = tl.load(GV + b * C + c, mask=mask_c, other=0.0).to(tl.float32) * v * (1.0 - v) * scale
    tl.store(GL + b * (N_IN + 1) * C + c, grad_v_logit, mask=mask_c)
    k = tl.arange(0, BLOCK_N)
    rows = (k[:, None] < N_IN) & mask_c[None, :]
    grad_w_logits = tl.full([BLOCK_N, BLOCK_C], 0.0, tl.float32)
    if HAS_GW:  # softmax: w * (g - sum_j w_j g_j)
        offs = (b * N_IN + k[:, None]) * C + c[None, :]
        w = tl.load(W + offs, mask=rows, other=0.0)
        g = tl.load(GW + offs, mask=rows, other=0.0).to(tl.float32)
        grad_w_logits = w * (g - _sum(w * g, axis=0)[None, :]) * scale
    tl.store(GL + b * (N_IN + 1) * C + (k[:, None] + 1) * C + c[None, :], grad_w_logits, mask=rows)


# ---------------------------------------------------------------------------------------------------------------
# launching

def _channels_last(y: torch.Tensor) -> bool:
    return not y.is_contiguous()  # covers() let only NCHW- or channels_last-contiguous maps through


def _map_blocks(channels: int, hw: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): the contiguous axis of the layout gets the longer side of the tile."""
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), 64)
        return block_c, max(2048 // block_c // 4, 1) if hw > 1 else 1
    block_hw = min(triton.next_power_of_2(hw), 256)
    return max(min(triton.next_power_of_2(channels), 2048 // block_hw // 2), 1), block_hw


def _slots(tensors: Sequence[torch.Tensor], filler: torch.Tensor) -> List[torch.Tensor]:
    return list(tensors) + [filler] * (MAX_INBOUNDS - len(tensors))


def _widths(inbounds: Sequence[torch.Tensor]) -> List[int]:
    return [a.shape[1] for a in inbounds] + [0] * (MAX_INBOUNDS - len(inbounds))


def _launch(kernel, grid: Tuple[int], *args, **meta) -> None:
    launches[0] += 1
    launching[0] = True  # the interpreter runs PyTorch operations of its own; an operation count leaves them out
    try:
        kernel[grid](*args, **meta)
    finally:
        launching[0] = False


def _out_dtype(y: torch.Tensor, inbounds: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {y.dtype, *(a.dtype for a in inbounds)}
    if len(dtypes) == 1:
        return y.dtype
    return max(dtypes, key=lambda dtype: (torch.finfo(dtype).bits, dtype == torch.float16))


def _map_grid(y: torch.Tensor) -> Tuple[Tuple[int], dict]:
    batch, channels, height, width = y.shape
    channels_last = _channels_last(y)
    block_c, block_hw = _map_blocks(channels, height * width, channels_last)
    return (batch * triton.cdiv(channels, block_c),), dict(CHANNELS_LAST=channels_last, BLOCK_C=block_c,
                                                            BLOCK_HW=block_hw)


def _pool(y: torch.Tensor, means: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gate's input [mean of y, the inbounds' means], (B, (n + 1) * C) float32."""
    batch, channels, height, width = y.shape
    g = torch.empty((batch, (len(means) + 1) * channels), device=y.device, dtype=torch.float32)
    grid, meta = _map_grid(y)
    _launch(_pool_kernel, grid, y, g, *_slots(means, g), channels, height * width, 1.0 / (height * width),
            N_IN=len(means), **meta)
    return g


def _mix(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: Sequence[torch.Tensor], relu: bool,
         reuse_y: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, channels, height, width = y.shape
    dtype = _out_dtype(y, inbounds)
    out = y if reuse_y and dtype == y.dtype else torch.empty_like(y, dtype=dtype)
    out_mean = torch.empty((batch, channels), device=y.device, dtype=dtype)
    grid, meta = _map_grid(y)
    _launch(_mix_fwd_kernel, grid, y, v, w, out, out_mean, *_slots(inbounds, y), *_widths(inbounds), channels,
            height * width, 1.0 / (height * width), N_IN=len(inbounds), RELU=relu, **meta)
    return out, out_mean


_valid_cache: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}


def _valid_tensor(valid_channels: Sequence[int], device: torch.device) -> torch.Tensor:
    key = (tuple(valid_channels), device)
    if key not in _valid_cache:
        with torch.inference_mode(False):
            _valid_cache[key] = torch.tensor(valid_channels, dtype=torch.int32, device=device)
    return _valid_cache[key]


def _weight_grid(batch: int, channels: int, num_inbounds: int) -> Tuple[Tuple[int], dict]:
    block_c = min(triton.next_power_of_2(channels), 128)
    return (batch * triton.cdiv(channels, block_c),), dict(BLOCK_N=triton.next_power_of_2(num_inbounds),
                                                            BLOCK_C=block_c, N_IN=num_inbounds)


def _weights(logits: torch.Tensor, scale: float, valid_channels: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """fc2's output (B, (n + 1) * C) to v (B, C) and w (B, n, C), float32."""
    batch, num_inbounds = logits.shape[0], len(valid_channels)
    channels = logits.shape[1] // (num_inbounds + 1)
    v = torch.empty((batch, channels), device=logits.device, dtype=torch.float32)
    w = torch.empty((batch, num_inbounds, channels), device=logits.device, dtype=torch.float32)
    grid, meta = _weight_grid(batch, channels, num_inbounds)
    _launch(_weights_fwd_kernel, grid, logits, _valid_tensor(valid_channels, logits.device), v, w, channels, scale,
            **meta)
    return v, w


class _GateFn(torch.autograd.Function):
    """A whole gate as one autograd node: its input g (one kernel), fc1, BatchNorm, ReLU and fc2 (PyTorch, in the
    parameters' dtype), v and w (one kernel), the mix and its mean (one kernel). Backward: v's and w's gradients
    (one pass over the maps), the head's, then every map's gradient in a second pass, where y and each inbound also
    take the gradient of their mean in g. The inbounds' means are the means of the inbounds (the history keeps
    them so), so their gradient goes to the maps here and none to the means: autograd adds nothing up for them."""

    @staticmethod
    def forward(ctx, settings: tuple, y: torch.Tensor, y_mixed: Optional[torch.Tensor], num_inbounds: int,
                *tensors: torch.Tensor):
        relu, scale, valid_channels, use_batch_stats, running, momentum, eps = settings
        inbounds, means = tensors[:num_inbounds], tensors[num_inbounds:2 * num_inbounds]
        fc1, bn_weight, bn_bias, fc2, fc2_bias = tensors[2 * num_inbounds:]
        running_mean, running_var = running
        with torch.autocast(y.device.type, enabled=False):
            g = _pool(y, means).to(fc1.dtype)
            z = torch.mm(g, fc1.flatten(1).t())
            z_norm, save_mean, save_invstd = torch.native_batch_norm(
                z, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps)
            h = torch.relu(z_norm)
            logits = torch.addmm(fc2_bias, h, fc2.flatten(1).t())
            v, w = _weights(logits, scale, valid_channels)
        mixed = y if y_mixed is None else y_mixed
        out, out_mean = _mix(mixed, v, w, inbounds, relu, reuse_y=False)
        ctx.settings = settings
        ctx.num_inbounds, ctx.two_ys = num_inbounds, y_mixed is not None
        ctx.save_for_backward(out, mixed, v, w, g, z, h, save_mean, save_invstd, *inbounds, fc1, bn_weight, fc2)
        ctx.mark_non_differentiable(v, w)
        ctx.set_materialize_grads(False)
        return out, out_mean, v, w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor], _grad_v, _grad_w):
        relu, scale, valid_channels, use_batch_stats, running, momentum, eps = ctx.settings
        out, y, v, w, g, z, h, save_mean, save_invstd, *rest = ctx.saved_tensors
        inbounds, (fc1, bn_weight, fc2) = rest[:ctx.num_inbounds], rest[ctx.num_inbounds:]
        batch, channels, height, width = y.shape
        memory_format = torch.channels_last if _channels_last(y) else torch.contiguous_format
        grad = torch.zeros_like(out) if grad is None else grad.contiguous(memory_format=memory_format)
        has_mean = grad_mean is not None
        grad_mean = grad_mean.contiguous() if has_mean else grad
        grid, meta = _map_grid(y)
        hw = height * width
        grad_v = torch.empty((batch, channels), device=y.device, dtype=torch.float32)
        grad_w = torch.empty((batch, len(inbounds), channels), device=y.device, dtype=torch.float32)
        _launch(_mix_bwd_kernel, grid, grad, grad_mean, out, y, v, w, grad, grad, grad_v, grad_w,
                *_slots(inbounds, y), *_slots([], y), *_widths(inbounds), channels, hw, 1.0 / hw, 0,
                HAS_GM=has_mean, HAS_GYM=False, N_IN=len(inbounds), RELU=relu, REDUCE=True, WRITE=False, **meta)
        grad_logits = torch.empty((batch, (len(inbounds) + 1) * channels), device=y.device, dtype=torch.float32)
        weight_grid, weight_meta = _weight_grid(batch, channels, len(inbounds))
        _launch(_weights_bwd_kernel, weight_grid, grad_v, grad_w, v, w, grad_logits, channels, scale, HAS_GV=True,
                HAS_GW=True, **weight_meta)
        grad_logits = grad_logits.to(fc2.dtype)
        grad_fc2_bias = grad_logits.sum(0)
        grad_fc2 = torch.mm(grad_logits.t(), h).view(fc2.shape)
        grad_h = torch.mm(grad_logits, fc2.flatten(1))
        grad_z_norm = torch.ops.aten.threshold_backward(grad_h, h, 0)
        grad_z, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_z_norm, z, bn_weight, running[0], running[1], save_mean, save_invstd, use_batch_stats, eps,
            [True, True, True])
        grad_g = torch.mm(grad_z, fc1.flatten(1))
        grad_fc1 = torch.mm(grad_z.t(), g).view(fc1.shape)
        grad_mixed = torch.empty_like(y)
        grad_inbounds = [torch.empty_like(a) for a in inbounds]
        grad_y = None
        if ctx.two_ys:  # y's mean alone reaches y; the mix reaches the y that was mixed (after drop-path)
            grad_y = (grad_g[:, :channels] / hw).to(y.dtype)[:, :, None, None].expand(y.shape)
        if ctx.two_ys:  # the mix's y, without the share of y's mean (grad_y): row 0 of g's gradient left out
            grad_g[:, :channels] = 0
        _launch(_mix_bwd_kernel, grid, grad, grad_mean, out, y, v, w, grad_mixed, grad_g, grad_v, grad_w,
                *_slots(inbounds, y), *_slots(grad_inbounds, grad_mixed), *_widths(inbounds), channels, hw,
                1.0 / hw, grad_g.stride(0), HAS_GM=has_mean, HAS_GYM=True, N_IN=len(inbounds),
                RELU=relu, REDUCE=False, WRITE=True, **meta)
        grad_means = [None] * len(inbounds)  # in the inbounds' gradients
        if not ctx.two_ys:  # y's gradient, its mean's share included
            grad_y, grad_mixed = grad_mixed, None
        return (None, grad_y, grad_mixed, None, *grad_inbounds, *grad_means, grad_fc1, grad_bn_weight,
                grad_bn_bias, grad_fc2, grad_fc2_bias)


def run_gate(gate, y: torch.Tensor, inbounds: List[torch.Tensor], means: List[torch.Tensor],
             y_mixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block output, its mean, v and w: the gate's computation (its modules' parameters, its BatchNorm's
    running statistics updated as the module would) by these kernels."""
    bn = gate.bn
    use_batch_stats = bn.use_batch_stats(y.shape[0])
    params = (gate.fc1.weight, bn.weight, bn.bias, gate.fc2.weight, gate.fc2.bias)
    relu = type(gate.out_act) is torch.nn.ReLU
    settings = (relu, gate.logit_scale, gate.weights.valid_channels, use_batch_stats,
                (bn.running_mean, bn.running_var), bn.running_momentum(use_batch_stats), bn.eps)
    means = [m.contiguous() for m in means]
    if torch.is_grad_enabled() and any(t.requires_grad for t in [y, y_mixed, *inbounds, *means, *params]):
        mixed = None if y_mixed is y else y_mixed
        return _GateFn.apply(settings, y, mixed, len(inbounds), *inbounds, *means, *params)
    with torch.autocast(y.device.type, enabled=False):
        fc1 = params[0]
        z = torch.mm(_pool(y, means).to(fc1.dtype), fc1.flatten(1).t())
        h = torch.relu(torch.native_batch_norm(z, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                               use_batch_stats, settings[5], bn.eps)[0])
        logits = torch.addmm(gate.fc2.bias, h, gate.fc2.weight.flatten(1).t())
        v, w = _weights(logits, gate.logit_scale, gate.weights.valid_channels)
    out, out_mean = _mix(y_mixed, v, w, inbounds, relu, reuse_y=y_mixed is y)
    return out, out_mean, v, w


def takes_gate(gate) -> bool:
    """Every gate whose BatchNorm has both affine parameters and running statistics (the default)."""
    bn = gate.bn
    return (gate.fc1.bias is None and bn.weight is not None and bn.bias is not None
            and bn.running_mean is not None and bn.running_var is not None)


def covers(y: torch.Tensor, inbounds: List[torch.Tensor], means: List[torch.Tensor]) -> bool:
    """Whether these kernels take these tensors: float32, bfloat16 or float16 maps on y's device, all NCHW- or all
    channels_last-contiguous, inbounds of y's batch and size and at most as wide, at most MAX_INBOUNDS of them
    (float64 stays with the formula: the kernels compute in float32)."""
    if y.dim() != 4 or y.dtype not in DTYPES or len(inbounds) > MAX_INBOUNDS or not inbounds:
        return False
    if y.is_contiguous():
        memory_format = torch.contiguous_format
    elif y.is_contiguous(memory_format=torch.channels_last):
        memory_format = torch.channels_last
    else:
        return False
    batch, channels, height, width = y.shape
    for a in inbounds:
        if (a.device != y.device or a.dtype not in DTYPES or a.dim() != 4 or a.shape[0] != batch
                or a.shape[1] > channels or a.shape[2:] != y.shape[2:]
                or not a.is_contiguous(memory_format=memory_format)):
            return False
    return len(means) == len(inbounds) and all(
        m.device == y.device and m.is_floating_point() and m.shape == (batch, channels) for m in means)


def self_check(device: torch.device) -> None:
    """Runs a tiny gate through every kernel, both ways, on ``device`` (raises where Triton cannot compile or
    launch them)."""
    with torch.inference_mode(False), torch.enable_grad():  # the first call may come in inference mode
        _check_gate(device)


def _check_gate(device: torch.device) -> None:
    channels, hidden = 4, 8
    y, a = (torch.randn(2, channels, 3, 3, device=device, requires_grad=True) for _ in range(2))
    params = [torch.randn(hidden, 2 * channels, 1, 1, device=device), torch.ones(hidden, device=device),
              torch.zeros(hidden, device=device), torch.randn(2 * channels, hidden, 1, 1, device=device),
              torch.zeros(2 * channels, device=device)]
    running = (torch.zeros(hidden, device=device), torch.ones(hidden, device=device))
    settings = (True, 1.0, [channels], True, running, 0.1, 1e-5)
    out, out_mean, _, _ = _GateFn.apply(settings, y, None, 1, a, a.detach().mean((2, 3)), *params)
    torch.autograd.grad(out.sum() + out_mean.sum(), [y, a])
