"""The gate's head in Triton: from the maps' means to v and w in one launch and a part of the mix kernel, and back
in a part of the mix's backward and one launch.

Forward: the gate's input ``g = [mean of y over H, W, the inbounds' means]`` and fc1's output ``z = fc1 g`` per
sample (one program a sample reads its y once); then, in each program of the mix kernel for its sample and
channels (:func:`sample_gate`), the BatchNorm (the batch's statistics, or the running ones), ReLU, fc2 and the
logit scale, ``v = sigmoid(l_v)`` and the masked softmax ``w`` over the inbounds. Backward: in each program of the
mix's first backward pass (:func:`logits_backward`), the logits' gradient for its sample and channels and their
share of h's (through fc2); then per block of columns of g, h's gradient summed over the shares and through the
ReLU, the BatchNorm's backward, g's gradient and every weight's. The matrices are small (the hidden width M is
8-80 in the registered models), so each product is a broadcast and a sum over a tile. All in float32; z, h, g, the
logits' gradient and h's shares stay in float32 buffers between the launches.
"""
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._triton_tiles import cdiv, columns, launch, map_tile, next_power_of_2, reduce_sum, row

__all__ = ['head_forward', 'sample_gate', 'logits_backward', 'head_backward']

TILE = 4096  # elements of the largest 3-d product tile of a program
POOL_TILE = 8192  # elements of y a program reads at once (one program reads a whole sample)


@triton.jit
def _fc1_share(FC1, G, b, width, first, x, c, mask_c, m, mask_m, STORE_G: tl.constexpr):
    """One slot of g (columns first + c, values x) times fc1's columns there, summed: its share of z[b]."""
    if STORE_G:
        tl.store(G + b * width + first + c, x, mask=mask_c)
    weight = tl.load(FC1 + m[:, None] * width + first + c[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    return reduce_sum(weight.to(tl.float32) * x[None, :], axis=1)


@triton.jit
def _head_in_kernel(Y, G, Z, FC1, M0, M1, M2, M3, M4, M5, M6, M7, C, HW, inv_hw, M, N_IN: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, STORE_G: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_HW: tl.constexpr, BLOCK_M: tl.constexpr):
    """Sample b: g[b] (STORE_G) and z[b] = fc1 g[b], float32."""
    b = tl.program_id(0).to(tl.int64)
    width = (N_IN + 1) * C
    m = tl.arange(0, BLOCK_M)
    mask_m = m < M
    z = tl.full([BLOCK_M], 0.0, tl.float32)
    for first in range(0, C, BLOCK_C):
        c = first + tl.arange(0, BLOCK_C)
        mask_c = c < C
        total = tl.full([BLOCK_C], 0.0, tl.float32)
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            total += reduce_sum(map_tile(Y, C, b, c, hw, hw < HW, HW, CHANNELS_LAST)[0], axis=1)
        z += _fc1_share(FC1, G, b, width, 0, total * inv_hw, c, mask_c, m, mask_m, STORE_G)
        z += _fc1_share(FC1, G, b, width, C, row(M0, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 1:
            z += _fc1_share(FC1, G, b, width, 2 * C, row(M1, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 2:
            z += _fc1_share(FC1, G, b, width, 3 * C, row(M2, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 3:
            z += _fc1_share(FC1, G, b, width, 4 * C, row(M3, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 4:
            z += _fc1_share(FC1, G, b, width, 5 * C, row(M4, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 5:
            z += _fc1_share(FC1, G, b, width, 6 * C, row(M5, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 6:
            z += _fc1_share(FC1, G, b, width, 7 * C, row(M6, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
        if N_IN > 7:
            z += _fc1_share(FC1, G, b, width, 8 * C, row(M7, b, 0, 1, C, c, mask_c), c, mask_c, m, mask_m, STORE_G)
    tl.store(Z + b * M + m, z, mask=mask_m)


@triton.jit
def _hidden_tile(P, rows, mask_b, m, mask_m, M):
    """Rows ``rows`` of a (B, M) float32 buffer, zero outside it, and the tile's mask."""
    mask = mask_b[:, None] & mask_m[None, :]
    return tl.load(P + rows[:, None] * M + m[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _bn_statistics(Z, RUN_MEAN, RUN_VAR, TRACKED, SAVE_MEAN, SAVE_INVSTD, batch, M, m, mask_m, momentum, eps, update,
                   BATCH_STATS: tl.constexpr, COUNT: tl.constexpr, BLOCK_B: tl.constexpr):
    """The BatchNorm's mean and inverse standard deviation per hidden unit: the batch's (where ``update``, also
    saved for backward, the running statistics moved as BatchNorm moves them and, COUNT, the batch counted in
    ``num_batches_tracked``) or the running ones."""
    if BATCH_STATS:
        total = m * 0.0
        for first in range(0, batch, BLOCK_B):
            rows = first + tl.arange(0, BLOCK_B)
            total += reduce_sum(_hidden_tile(Z, rows, rows < batch, m, mask_m, M)[0], axis=0)
        mean = total / batch
        squares = m * 0.0
        for first in range(0, batch, BLOCK_B):
            rows = first + tl.arange(0, BLOCK_B)
            z, mask = _hidden_tile(Z, rows, rows < batch, m, mask_m, M)
            deviation = tl.where(mask, z - mean[None, :], 0.0)
            squares += reduce_sum(deviation * deviation, axis=0)
        var = squares / batch
        invstd = 1.0 / tl.sqrt(var + eps)
        if update:  # a branch, not a mask: masks must be boolean, and Triton 3.9's interpreter types a scalar
            # comparison as its operands' type
            tl.store(SAVE_MEAN + m, mean, mask=mask_m)
            tl.store(SAVE_INVSTD + m, invstd, mask=mask_m)
            running_mean = tl.load(RUN_MEAN + m, mask=mask_m, other=0.0).to(tl.float32)
            running_var = tl.load(RUN_VAR + m, mask=mask_m, other=1.0).to(tl.float32)
            unbiased = var * (batch / (batch - 1.0))  # batch statistics only where the batch has two samples or more
            tl.store(RUN_MEAN + m, ((1.0 - momentum) * running_mean + momentum * mean).to(RUN_MEAN.dtype.element_ty),
                     mask=mask_m)
            tl.store(RUN_VAR + m, ((1.0 - momentum) * running_var + momentum * unbiased).to(RUN_VAR.dtype.element_ty),
                     mask=mask_m)
            if COUNT:
                tl.store(TRACKED, tl.load(TRACKED) + 1)
    else:
        mean = tl.load(RUN_MEAN + m, mask=mask_m, other=0.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(tl.load(RUN_VAR + m, mask=mask_m, other=1.0).to(tl.float32) + eps)
    return mean, invstd


@triton.jit
def _logit_row(h, FC2, FC2_BIAS, first, c, mask_c, m, mask_m, M, scale):
    """fc2's outputs ``first + c`` for one sample's h, times the logit scale: (BLOCK_C,)."""
    weight = tl.load(FC2 + (first + c[:, None]) * M + m[None, :], mask=mask_c[:, None] & mask_m[None, :], other=0.0)
    bias = tl.load(FC2_BIAS + first + c, mask=mask_c, other=0.0).to(tl.float32)
    return (reduce_sum(weight.to(tl.float32) * h[None, :], axis=1) + bias) * scale


@triton.jit
def _inbound_logits(h, FC2, FC2_BIAS, VALID, k, C, c, mask_c, m, mask_m, M, scale):
    """Inbound k's logits, -inf in the channels its zero padding made."""
    logits = _logit_row(h, FC2, FC2_BIAS, (k + 1) * C, c, mask_c, m, mask_m, M, scale)
    return tl.where(c < tl.load(VALID + k), logits, float('-inf'))


@triton.jit
def _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, k, C, c, mask_c, m, mask_m, M, scale, shift, total,
                    N_IN: tl.constexpr):
    """w_k of sample b in channels c as a (BLOCK_C, 1) column, also stored to W."""
    w = tl.exp(_inbound_logits(h, FC2, FC2_BIAS, VALID, k, C, c, mask_c, m, mask_m, M, scale) - shift) / total
    tl.store(W + (b * N_IN + k) * C + c, w, mask=mask_c)
    return w[:, None]


@triton.jit
def sample_gate(Z, H, BN_WEIGHT, BN_BIAS, RUN_MEAN, RUN_VAR, TRACKED, SAVE_MEAN, SAVE_INVSTD, FC2, FC2_BIAS, VALID,
                V, W, b, c, mask_c, first_block, batch, C, M, momentum, eps, scale, N_IN: tl.constexpr,
                BATCH_STATS: tl.constexpr, COUNT: tl.constexpr, STORE_H: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """The head's second half for sample b in channels c, inside the mix kernel (so no launch of its own):
    h = ReLU(BatchNorm(z)) (STORE_H: stored, by the program of the first channels), v = sigmoid(l_v) and w = the
    softmax of the inbounds' logits, stored to V and W and returned as (BLOCK_C, 1) columns, w's eight slots zero
    past N_IN. Sample 0's first program moves the BatchNorm's running statistics. Every program computes the
    batch's statistics from z again (B x M floats, read from cache) instead of waiting for a launch of their own."""
    m = tl.arange(0, BLOCK_M)
    mask_m = m < M
    mean, invstd = _bn_statistics(Z, RUN_MEAN, RUN_VAR, TRACKED, SAVE_MEAN, SAVE_INVSTD, batch, M, m, mask_m,
                                  momentum, eps, first_block & (b == 0), BATCH_STATS, COUNT, BLOCK_B)
    bn_scale = tl.load(BN_WEIGHT + m, mask=mask_m, other=0.0).to(tl.float32) * invstd
    bn_shift = tl.load(BN_BIAS + m, mask=mask_m, other=0.0).to(tl.float32) - mean * bn_scale
    z = tl.load(Z + b * M + m, mask=mask_m, other=0.0)
    h = tl.where(mask_m, tl.maximum(z * bn_scale + bn_shift, 0.0), 0.0)
    if STORE_H:
        if first_block:
            tl.store(H + b * M + m, h, mask=mask_m)
    v = 1.0 / (1.0 + tl.exp(-_logit_row(h, FC2, FC2_BIAS, 0, c, mask_c, m, mask_m, M, scale)))
    tl.store(V + b * C + c, v, mask=mask_c)
    total = v * 0.0  # the softmax, online: the sum of exp(logit - top)
    top = total - float('inf')  # and the largest logit so far
    for k in range(N_IN):
        logits = _inbound_logits(h, FC2, FC2_BIAS, VALID, k, C, c, mask_c, m, mask_m, M, scale)
        new_top = tl.maximum(top, logits)
        shift = tl.where(new_top == float('-inf'), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.exp(logits - shift)
        top = new_top
    shift = tl.where(top == float('-inf'), 0.0, top)
    total = tl.where(total > 0.0, total, 1.0)
    w0 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 0, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    w1 = w0 * 0.0
    w2 = w1
    w3 = w1
    w4 = w1
    w5 = w1
    w6 = w1
    w7 = w1
    if N_IN > 1:
        w1 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 1, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    if N_IN > 2:
        w2 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 2, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    if N_IN > 3:
        w3 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 3, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    if N_IN > 4:
        w4 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 4, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    if N_IN > 5:
        w5 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 5, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    if N_IN > 6:
        w6 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 6, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    if N_IN > 7:
        w7 = _softmax_weight(h, FC2, FC2_BIAS, VALID, W, b, 7, C, c, mask_c, m, mask_m, M, scale, shift, total, N_IN)
    return v[:, None], w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _logits_share(grad_logits, GL, FC2, b, width, first, c, mask_c, m, mask_m, M):
    """Stores the gradient of fc2's outputs ``first + c`` of sample b (scaled logits' gradient times the scale, a
    (BLOCK_C, 1) column) and returns its share of h's gradient, (BLOCK_M,)."""
    tl.store(GL + b * width + first + c[:, None], grad_logits, mask=mask_c[:, None])
    weight = tl.load(FC2 + (first + c[:, None]) * M + m[None, :], mask=mask_c[:, None] & mask_m[None, :], other=0.0)
    return reduce_sum(grad_logits * weight.to(tl.float32), axis=0)


@triton.jit
def logits_backward(grad_v, gw0, gw1, gw2, gw3, gw4, gw5, gw6, gw7, V, W, GL, GH_PARTS, FC2, b, block, blocks, C, c,
                    mask_c, M, scale, N_IN: tl.constexpr, BLOCK_M: tl.constexpr):
    """The head's first steps back for sample b in channels c (block ``block`` of ``blocks``), at the end of the
    mix's backward (so no launch of its own): from v's and w's gradients ((BLOCK_C,) each, w's slots past N_IN zero)
    the gradient of fc2's outputs (sigmoid's and softmax's backward) into GL, and these channels' share of h's
    gradient (through fc2) into row (b, block) of GH_PARTS. v and w are read here, not kept through the mix's
    loop, where they would hold registers."""
    m = tl.arange(0, BLOCK_M)
    mask_m = m < M
    width = (N_IN + 1) * C
    v = row(V, b, 0, 1, C, c, mask_c)[:, None]
    w0, w1, w2, w3, w4, w5, w6, w7 = columns(W, N_IN * C, b, 0, C, c, mask_c, 1.0, N_IN)
    grad_h = _logits_share(grad_v[:, None] * v * (1.0 - v) * scale, GL, FC2, b, width, 0, c, mask_c, m, mask_m, M)
    dot = (w0 * gw0[:, None] + w1 * gw1[:, None] + w2 * gw2[:, None] + w3 * gw3[:, None] + w4 * gw4[:, None]
           + w5 * gw5[:, None] + w6 * gw6[:, None] + w7 * gw7[:, None])  # softmax: w * (g - sum_j w_j g_j)
    grad_h += _logits_share(w0 * (gw0[:, None] - dot) * scale, GL, FC2, b, width, C, c, mask_c, m, mask_m, M)
    if N_IN > 1:
        grad_h += _logits_share(w1 * (gw1[:, None] - dot) * scale, GL, FC2, b, width, 2 * C, c, mask_c, m, mask_m, M)
    if N_IN > 2:
        grad_h += _logits_share(w2 * (gw2[:, None] - dot) * scale, GL, FC2, b, width, 3 * C, c, mask_c, m, mask_m, M)
    if N_IN > 3:
        grad_h += _logits_share(w3 * (gw3[:, None] - dot) * scale, GL, FC2, b, width, 4 * C, c, mask_c, m, mask_m, M)
    if N_IN > 4:
        grad_h += _logits_share(w4 * (gw4[:, None] - dot) * scale, GL, FC2, b, width, 5 * C, c, mask_c, m, mask_m, M)
    if N_IN > 5:
        grad_h += _logits_share(w5 * (gw5[:, None] - dot) * scale, GL, FC2, b, width, 6 * C, c, mask_c, m, mask_m, M)
    if N_IN > 6:
        grad_h += _logits_share(w6 * (gw6[:, None] - dot) * scale, GL, FC2, b, width, 7 * C, c, mask_c, m, mask_m, M)
    if N_IN > 7:
        grad_h += _logits_share(w7 * (gw7[:, None] - dot) * scale, GL, FC2, b, width, 8 * C, c, mask_c, m, mask_m, M)
    tl.store(GH_PARTS + (b * blocks + block) * M + m, grad_h, mask=mask_m)


@triton.jit
def _grad_z_tile(GH_PARTS, H, rows, mask_b, m, mask_m, M, blocks):
    """The gradient of the BatchNorm's output for samples ``rows``: h's gradient (the sum of its parts over the
    blocks of channels) through the ReLU; and the tile's mask."""
    mask = mask_b[:, None] & mask_m[None, :]
    grad_h = tl.load(GH_PARTS + (rows[:, None] * blocks) * M + m[None, :], mask=mask, other=0.0)
    for block in range(1, blocks):
        grad_h += tl.load(GH_PARTS + (rows[:, None] * blocks + block) * M + m[None, :], mask=mask, other=0.0)
    h = tl.load(H + rows[:, None] * M + m[None, :], mask=mask, other=0.0)
    return tl.where(h > 0.0, grad_h, 0.0), mask


@triton.jit
def _head_grad_kernel(GH_PARTS, Z, G, H, GL, FC1, BN_WEIGHT, RUN_MEAN, RUN_VAR, SAVE_MEAN, SAVE_INVSTD,
                      GG, GRAD_FC1, GRAD_BN_WEIGHT, GRAD_BN_BIAS, GRAD_FC2, GRAD_FC2_BIAS,
                      batch, width, M, blocks, eps, BATCH_STATS: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr):
    """Columns ``j`` of g (fc1's input, fc2's output): the BatchNorm's output gradient (h's, summed over its
    shares, through the ReLU), the BatchNorm's backward (each program sums it over the batch, it is small; the
    first stores the BatchNorm's weight and bias gradients), g's gradient, fc1's and fc2's weight gradients there
    and fc2's bias gradient."""
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    mask_m = m < M
    if BATCH_STATS:
        mean = tl.load(SAVE_MEAN + m, mask=mask_m, other=0.0)
        invstd = tl.load(SAVE_INVSTD + m, mask=mask_m, other=0.0)
    else:
        mean = tl.load(RUN_MEAN + m, mask=mask_m, other=0.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(tl.load(RUN_VAR + m, mask=mask_m, other=1.0).to(tl.float32) + eps)
    gamma = tl.load(BN_WEIGHT + m, mask=mask_m, other=0.0).to(tl.float32)
    grad_bias = m * 0.0  # BatchNorm's bias: the sum of the gradient over the batch
    grad_weight = m * 0.0  # and its weight: of the gradient times the normalised z
    for first in range(0, batch, BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        grad, mask = _grad_z_tile(GH_PARTS, H, rows, rows < batch, m, mask_m, M, blocks)
        z = _hidden_tile(Z, rows, rows < batch, m, mask_m, M)[0]
        grad_bias += reduce_sum(grad, axis=0)
        grad_weight += reduce_sum(tl.where(mask, grad * (z - mean[None, :]) * invstd[None, :], 0.0), axis=0)
    if pid == 0:
        tl.store(GRAD_BN_WEIGHT + m, grad_weight.to(GRAD_BN_WEIGHT.dtype.element_ty), mask=mask_m)
        tl.store(GRAD_BN_BIAS + m, grad_bias.to(GRAD_BN_BIAS.dtype.element_ty), mask=mask_m)
    j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = j < width
    fc1 = tl.load(FC1 + m[:, None] * width + j[None, :], mask=mask_m[:, None] & mask_j[None, :], other=0.0)
    fc1 = fc1.to(tl.float32)
    grad_fc1 = tl.full([BLOCK_M, BLOCK_J], 0.0, tl.float32)
    grad_fc2 = tl.full([BLOCK_J, BLOCK_M], 0.0, tl.float32)
    grad_fc2_bias = tl.full([BLOCK_J], 0.0, tl.float32)
    for first in range(0, batch, BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        mask_b = rows < batch
        grad, mask = _grad_z_tile(GH_PARTS, H, rows, mask_b, m, mask_m, M, blocks)
        if BATCH_STATS:
            z = _hidden_tile(Z, rows, mask_b, m, mask_m, M)[0]
            z_norm = (z - mean[None, :]) * invstd[None, :]
            grad = (gamma * invstd)[None, :] * (grad - (grad_bias / batch)[None, :]
                                                - z_norm * (grad_weight / batch)[None, :])
        else:
            grad = grad * (gamma * invstd)[None, :]
        grad = tl.where(mask, grad, 0.0)  # z's gradient
        mask_bj = mask_b[:, None] & mask_j[None, :]
        g = tl.load(G + rows[:, None] * width + j[None, :], mask=mask_bj, other=0.0)
        grad_fc1 += reduce_sum(grad[:, :, None] * g[:, None, :], axis=0)
        tl.store(GG + rows[:, None] * width + j[None, :], reduce_sum(grad[:, :, None] * fc1[None, :, :], axis=1),
                 mask=mask_bj)
        grad_logits = tl.load(GL + rows[:, None] * width + j[None, :], mask=mask_bj, other=0.0)
        h = _hidden_tile(H, rows, mask_b, m, mask_m, M)[0]
        grad_fc2 += reduce_sum(grad_logits[:, :, None] * h[:, None, :], axis=0)
        grad_fc2_bias += reduce_sum(grad_logits, axis=0)
    tl.store(GRAD_FC1 + m[:, None] * width + j[None, :], grad_fc1.to(GRAD_FC1.dtype.element_ty),
             mask=mask_m[:, None] & mask_j[None, :])
    tl.store(GRAD_FC2 + j[:, None] * M + m[None, :], grad_fc2.to(GRAD_FC2.dtype.element_ty),
             mask=mask_j[:, None] & mask_m[None, :])
    tl.store(GRAD_FC2_BIAS + j, grad_fc2_bias.to(GRAD_FC2_BIAS.dtype.element_ty), mask=mask_j)


# ---------------------------------------------------------------------------------------------------------------
# launching

def _pool_blocks(channels: int, hw: int, channels_last: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of the pooling tile: large, the layout's contiguous axis the longer side."""
    if channels_last:
        block_c = min(next_power_of_2(channels), 64)
        return block_c, max(min(next_power_of_2(hw), POOL_TILE // block_c), 1)
    block_hw = min(next_power_of_2(hw), 1024)
    return max(min(next_power_of_2(channels), POOL_TILE // block_hw, 64), 1), block_hw


def _rows_per_tile(batch: int, *widths: int) -> int:
    """Rows of a block of samples such that a product tile (rows x widths) has at most TILE elements."""
    other = 1
    for width in widths:
        other *= width
    return max(min(next_power_of_2(batch), TILE // other), 1)


_valid_cache = {}


def _valid_tensor(valid_channels: Sequence[int], device: torch.device) -> torch.Tensor:
    key = (tuple(valid_channels), device)
    if key not in _valid_cache:
        with torch.inference_mode(False):
            _valid_cache[key] = torch.tensor(valid_channels, dtype=torch.int32, device=device)
    return _valid_cache[key]


def head_forward(y: torch.Tensor, means: Sequence[torch.Tensor], channels_last: bool, fc1: torch.Tensor,
                 bn_params: Tuple[torch.Tensor, torch.Tensor], running: Tuple[torch.Tensor, ...],
                 use_batch_stats: bool, momentum: float, eps: float, fc2: torch.Tensor, fc2_bias: torch.Tensor,
                 scale: float, valid_channels: Sequence[int], for_backward: bool):
    """The head's first half (one launch: g and z = fc1 g per sample); returns the arguments of its second half,
    :func:`sample_gate`, which the mix kernel runs (keywords of that kernel), v (B, C) and w (B, n, C), float32,
    which it writes, and (for_backward) what the backward reads: (g, z, h, the batch's mean and inverse standard
    deviation). ``running``: the BatchNorm's running mean and variance, and its ``num_batches_tracked`` where the
    kernel is to count a batch normalised with its statistics (else None)."""
    batch, channels, height, width = y.shape
    hidden, num_inbounds = fc1.shape[0], len(means)
    block_m = next_power_of_2(hidden)
    new = dict(device=y.device, dtype=torch.float32)
    g = torch.empty((batch, (num_inbounds + 1) * channels), **new) if for_backward else y
    z = torch.empty((batch, hidden), **new)
    block_c, block_hw = _pool_blocks(channels, height * width, channels_last)
    launch(_head_in_kernel, (batch,), y, g, z, fc1, *means, *[means[0]] * (8 - num_inbounds), channels,
           height * width, 1.0 / (height * width), hidden, N_IN=num_inbounds, CHANNELS_LAST=channels_last,
           STORE_G=for_backward, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_M=block_m)
    h = torch.empty((batch, hidden), **new) if for_backward else z
    save_mean, save_invstd = (torch.empty(hidden, **new) for _ in range(2)) if use_batch_stats else (z, z)
    v = torch.empty((batch, channels), **new)
    w = torch.empty((batch, num_inbounds, channels), **new)
    running_mean, running_var, tracked = running
    second_half = dict(
        Z=z, H=h, BN_WEIGHT=bn_params[0], BN_BIAS=bn_params[1], RUN_MEAN=running_mean, RUN_VAR=running_var,
        TRACKED=z if tracked is None else tracked, SAVE_MEAN=save_mean, SAVE_INVSTD=save_invstd, FC2=fc2,
        FC2_BIAS=fc2_bias, VALID=_valid_tensor(valid_channels, y.device), V=v, W=w, batch=batch, M=hidden,
        momentum=momentum, eps=eps, scale=scale, BATCH_STATS=use_batch_stats, COUNT=tracked is not None,
        STORE_H=for_backward, BLOCK_B=_rows_per_tile(batch, block_m), BLOCK_M=block_m)
    return second_half, v, w, (g, z, h, save_mean, save_invstd)


def head_backward(grad_logits: torch.Tensor, grad_h_parts: torch.Tensor, saved: tuple, fc1: torch.Tensor,
                  bn_weight: torch.Tensor, running: Tuple[torch.Tensor, ...], use_batch_stats: bool, eps: float,
                  fc2: torch.Tensor):
    """g's gradient (B, (n + 1) * C) float32, and the gradients of fc1, the BatchNorm's weight and bias, fc2 and
    its bias, in one launch from what the mix's backward wrote (:func:`logits_backward`): the gradient of fc2's
    outputs (B, (n + 1) * C) and h's in parts (B, blocks of channels, M)."""
    g, z, h, save_mean, save_invstd = saved
    batch, width = g.shape
    hidden = fc1.shape[0]
    block_m = next_power_of_2(hidden)
    grad_g = torch.empty((batch, width), device=g.device, dtype=torch.float32)
    grads = [torch.empty_like(t) for t in (fc1, bn_weight, bn_weight, fc2)] + [
        torch.empty(width, device=g.device, dtype=fc2.dtype)]
    block_j = min(next_power_of_2(width), max(TILE // 4 // block_m, 16))
    block_b = _rows_per_tile(batch, block_j, block_m)
    launch(_head_grad_kernel, (cdiv(width, block_j),), grad_h_parts, z, g, h, grad_logits, fc1, bn_weight,
           *running[:2], save_mean, save_invstd, grad_g, *grads, batch, width, hidden, grad_h_parts.shape[1], eps,
           BATCH_STATS=use_batch_stats, BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_M=block_m)
    return grad_g, grads
