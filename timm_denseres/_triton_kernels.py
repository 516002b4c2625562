"""The gate's CUDA kernels, in Triton: the same interface as the CPU kernels of ``_kernels.py``.

- the mix: ``act(v * y + sum_k w_k * a_k)`` and its mean over H, W in one pass over the maps, and its backward in
  two (the reductions for v and w, then every input's gradient);
- the head (``_triton_head.py``): from y and the inbounds' means to ``v = sigmoid(s * l_v)`` and
  ``w = softmax(s * l_w)`` over the inbounds (padding left out) through fc1, the BatchNorm, ReLU and fc2: one
  launch, then each program of the mix computes v and w for its sample and channels; backward, each program of the
  mix's first pass takes its channels back to fc2's outputs and h, and one launch does the rest.

A gate is two launches forward and three backward. float32, bfloat16 or float16 maps (computed in float32), NCHW
or channels_last, inbounds as wide as y or narrower (the zero padding is implied), up to ``MAX_INBOUNDS`` inbounds.
Under Triton's interpreter (``TRITON_INTERPRET=1``) the same kernels run on CPU tensors, which is how they are
tested without a GPU. Imported only where a gate takes this path (``timm_denseres.gate``): a CPU-only PyTorch has
no Triton.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton_head import TILE, head_backward, head_forward, logits_backward, sample_gate
from ._triton_tiles import (cdiv, column, columns, launch, launches, launching, map_offsets, map_tile,
                            next_power_of_2, reduce_sum)

__all__ = ['MAX_INBOUNDS', 'covers', 'takes_gate', 'run_gate', 'self_check', 'launches', 'launching']

MAX_INBOUNDS = 8  # the kernels' inbound slots
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _mix_fwd_kernel(Y, OUT, OUT_MEAN, A0, A1, A2, A3, A4, A5, A6, A7, C0, C1, C2, C3, C4, C5, C6, C7, C, HW, inv_hw,
                    Z, H, BN_WEIGHT, BN_BIAS, RUN_MEAN, RUN_VAR, TRACKED, SAVE_MEAN, SAVE_INVSTD, FC2, FC2_BIAS,
                    VALID, V, W, batch, M, momentum, eps, scale, N_IN: tl.constexpr, RELU: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                    BATCH_STATS: tl.constexpr, COUNT: tl.constexpr, STORE_H: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """Channels ``c`` of sample b: v and w (the head's second half, :func:`sample_gate`), then the mix and its
    mean over H, W."""
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    v, w0, w1, w2, w3, w4, w5, w6, w7 = sample_gate(
        Z, H, BN_WEIGHT, BN_BIAS, RUN_MEAN, RUN_VAR, TRACKED, SAVE_MEAN, SAVE_INVSTD, FC2, FC2_BIAS, VALID, V, W, b,
        c, mask_c, pid % blocks_c == 0, batch, C, M, momentum, eps, scale, N_IN, BATCH_STATS, COUNT, STORE_H,
        BLOCK_B, BLOCK_M)
    total = tl.full([BLOCK_C], 0.0, tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask_hw = hw < HW
        y, offs, mask = map_tile(Y, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)
        out = v * y + w0 * map_tile(A0, C0, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 1:
            out += w1 * map_tile(A1, C1, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 2:
            out += w2 * map_tile(A2, C2, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 3:
            out += w3 * map_tile(A3, C3, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 4:
            out += w4 * map_tile(A4, C4, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 5:
            out += w5 * map_tile(A5, C5, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 6:
            out += w6 * map_tile(A6, C6, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if N_IN > 7:
            out += w7 * map_tile(A7, C7, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
        if RELU:
            out = tl.maximum(out, 0.0)
        out = out.to(OUT.dtype.element_ty)
        tl.store(OUT + offs, out, mask=mask)
        total += reduce_sum(tl.where(mask, out.to(tl.float32), 0.0), axis=1)
    tl.store(OUT_MEAN + b * C + c, (total * inv_hw).to(OUT_MEAN.dtype.element_ty), mask=mask_c)


@triton.jit
def _inbound_grad(g, A, GA, channels, w, grad_mean, b, c, hw, mask_hw, HW, REDUCE: tl.constexpr,
                  WRITE: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """WRITE: stores an inbound's gradient ``g * w`` plus its mean's (its own channels); REDUCE: returns its share
    of w's."""
    offs = map_offsets(b, c, hw, channels, HW, CHANNELS_LAST)
    mask = (c[:, None] < channels) & mask_hw[None, :]
    if WRITE:
        tl.store(GA + offs, (g * w + grad_mean).to(GA.dtype.element_ty), mask=mask)
    share = tl.full([g.shape[0]], 0.0, tl.float32)
    if REDUCE:
        share = reduce_sum(g * tl.load(A + offs, mask=mask, other=0.0).to(tl.float32), axis=1)
    return share


@triton.jit
def _mix_bwd_kernel(G, GM, OUT, Y, V, W, GY, GYM, GL, GH_PARTS, FC2,
                    A0, A1, A2, A3, A4, A5, A6, A7, GA0, GA1, GA2, GA3, GA4, GA5, GA6, GA7,
                    C0, C1, C2, C3, C4, C5, C6, C7,
                    C, HW, inv_hw, gym_stride, M, scale, HAS_GM: tl.constexpr, HAS_GYM: tl.constexpr,
                    N_IN: tl.constexpr, RELU: tl.constexpr, REDUCE: tl.constexpr, WRITE: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """The mix's backward, g = act'(out) * (grad + grad_mean / HW). REDUCE: v's and w's gradients (sums over H, W
    of g * y and g * a_k), and from them the head's first steps back (:func:`logits_backward`); WRITE: y's gradient
    g * v and each inbound's g * w_k, each plus (HAS_GYM) the gradient of its mean over H, W, spread over H, W (row
    GYM of the gate's input gradient: y's mean, then the inbounds'). Two launches, REDUCE then WRITE: GYM comes from
    the head's backward, which needs REDUCE's logit gradients."""
    pid = tl.program_id(0)
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    b = (pid // blocks_c).to(tl.int64)
    c = (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    v = column(V, C, b, 0, C, c, mask_c, 1.0)
    grad_mean = tl.full([BLOCK_C, 1], 0.0, tl.float32)
    if HAS_GM:  # the output mean's gradient, spread over H, W
        grad_mean = column(GM, C, b, 0, C, c, mask_c, inv_hw)
    gm_y = tl.full([BLOCK_C, 1], 0.0, tl.float32)
    gm0, gm1, gm2, gm3, gm4, gm5, gm6, gm7 = gm_y, gm_y, gm_y, gm_y, gm_y, gm_y, gm_y, gm_y
    if HAS_GYM:
        gm_y = columns(GYM, gym_stride, b, 0, C, c, mask_c, inv_hw, 1)[0]
        gm0, gm1, gm2, gm3, gm4, gm5, gm6, gm7 = columns(GYM, gym_stride, b, 1, C, c, mask_c, inv_hw, N_IN)
    w0, w1, w2, w3, w4, w5, w6, w7 = columns(W, N_IN * C, b, 0, C, c, mask_c, 1.0, N_IN)
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
        g, offs, mask = map_tile(G, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)
        g = g + grad_mean
        if RELU:
            out = map_tile(OUT, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0]
            g = tl.where(out > 0.0, g, 0.0)
        g = tl.where(mask, g, 0.0)
        if REDUCE:
            grad_v += reduce_sum(g * map_tile(Y, C, b, c, hw, mask_hw, HW, CHANNELS_LAST)[0], axis=1)
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
        logits_backward(grad_v, gw0, gw1, gw2, gw3, gw4, gw5, gw6, gw7, V, W, GL, GH_PARTS, FC2, b, pid % blocks_c,
                        blocks_c, C, c, mask_c, M, scale, N_IN, BLOCK_M)


# ---------------------------------------------------------------------------------------------------------------
# launching

def _channels_last(y: torch.Tensor) -> bool:
    return not y.is_contiguous()  # covers() let only NCHW- or channels_last-contiguous maps through


def _map_blocks(channels: int, hw: int, channels_last: bool, max_block_c: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): the contiguous axis of the layout gets the longer side of the tile."""
    if channels_last:
        block_c = min(next_power_of_2(channels), 64, max_block_c)
        return block_c, max(2048 // block_c // 4, 1) if hw > 1 else 1
    block_hw = min(next_power_of_2(hw), 256)
    return max(min(next_power_of_2(channels), 2048 // block_hw // 2, max_block_c), 1), block_hw


def _slots(tensors: Sequence[torch.Tensor], filler: torch.Tensor) -> List[torch.Tensor]:
    return list(tensors) + [filler] * (MAX_INBOUNDS - len(tensors))


def _widths(inbounds: Sequence[torch.Tensor]) -> List[int]:
    return [a.shape[1] for a in inbounds] + [0] * (MAX_INBOUNDS - len(inbounds))


def _out_dtype(y: torch.Tensor, inbounds: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {y.dtype, *(a.dtype for a in inbounds)}
    if len(dtypes) == 1:
        return y.dtype
    return max(dtypes, key=lambda dtype: (torch.finfo(dtype).bits, dtype == torch.float16))


def _map_grid(y: torch.Tensor, max_block_c: int = 1024) -> Tuple[Tuple[int], dict]:
    batch, channels, height, width = y.shape
    channels_last = _channels_last(y)
    block_c, block_hw = _map_blocks(channels, height * width, channels_last, max_block_c)
    return (batch * cdiv(channels, block_c),), dict(CHANNELS_LAST=channels_last, BLOCK_C=block_c,
                                                            BLOCK_HW=block_hw)


def _mix(y: torch.Tensor, head: dict, inbounds: Sequence[torch.Tensor], relu: bool,
         reuse_y: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mix and its mean, v and w computed in the same kernel from ``head`` (``head_forward``'s)."""
    batch, channels, height, width = y.shape
    dtype = _out_dtype(y, inbounds)
    out = y if reuse_y and dtype == y.dtype else torch.empty_like(y, dtype=dtype)
    out_mean = torch.empty((batch, channels), device=y.device, dtype=dtype)
    grid, meta = _map_grid(y, max_block_c=max(TILE // head['BLOCK_M'], 1))  # fc2's rows for the block: one tile
    launch(_mix_fwd_kernel, grid, y, out, out_mean, *_slots(inbounds, y), *_widths(inbounds), channels,
           height * width, 1.0 / (height * width), N_IN=len(inbounds), RELU=relu, **meta, **head)
    return out, out_mean


class _GateFn(torch.autograd.Function):
    """A whole gate as one autograd node: the head's first half (one launch, ``_triton_head.py``), then the mix
    with its mean, which computes v and w first (one). Backward: v's and w's gradients (one pass over the maps,
    which also takes them back through fc2), the rest of the head's (one launch), then every map's gradient in a
    second pass, where y and each inbound also take the
    gradient of their mean in g. The inbounds' means are the means of the inbounds (the history keeps them so), so
    their gradient goes to the maps here and none to the means: autograd adds nothing up for them."""

    @staticmethod
    def forward(ctx, settings: tuple, y: torch.Tensor, y_mixed: Optional[torch.Tensor], num_inbounds: int,
                *tensors: torch.Tensor):
        relu, scale, valid_channels, use_batch_stats, running, momentum, eps = settings
        inbounds, means = tensors[:num_inbounds], tensors[num_inbounds:2 * num_inbounds]
        fc1, bn_weight, bn_bias, fc2, fc2_bias = tensors[2 * num_inbounds:]
        head, v, w, saved = head_forward(y, means, _channels_last(y), fc1, (bn_weight, bn_bias), running,
                                         use_batch_stats, momentum, eps, fc2, fc2_bias, scale, valid_channels,
                                         for_backward=True)
        mixed = y if y_mixed is None else y_mixed
        out, out_mean = _mix(mixed, head, inbounds, relu, reuse_y=False)
        ctx.settings = settings
        ctx.num_inbounds, ctx.two_ys = num_inbounds, y_mixed is not None
        ctx.save_for_backward(out, mixed, v, w, *saved, *inbounds, fc1, bn_weight, fc2)
        ctx.mark_non_differentiable(v, w)
        ctx.set_materialize_grads(False)
        return out, out_mean, v, w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor], _grad_v, _grad_w):
        relu, scale, valid_channels, use_batch_stats, running, momentum, eps = ctx.settings
        out, y, v, w, *rest = ctx.saved_tensors
        saved, inbounds, (fc1, bn_weight, fc2) = rest[:5], rest[5:5 + ctx.num_inbounds], rest[5 + ctx.num_inbounds:]
        batch, channels, height, width = y.shape
        memory_format = torch.channels_last if _channels_last(y) else torch.contiguous_format
        grad = torch.zeros_like(out) if grad is None else grad.contiguous(memory_format=memory_format)
        has_mean = grad_mean is not None
        grad_mean = grad_mean.contiguous() if has_mean else grad
        hw = height * width
        hidden = fc1.shape[0]
        block_m = next_power_of_2(hidden)
        grid, meta = _map_grid(y, max_block_c=max(TILE // block_m, 1))  # fc2's rows for the block: one tile
        new = dict(device=y.device, dtype=torch.float32)
        grad_logits = torch.empty((batch, (len(inbounds) + 1) * channels), **new)
        grad_h_parts = torch.empty((batch, grid[0] // batch, hidden), **new)
        launch(_mix_bwd_kernel, grid, grad, grad_mean, out, y, v, w, grad, grad, grad_logits, grad_h_parts, fc2,
               *_slots(inbounds, y), *_slots([], y), *_widths(inbounds), channels, hw, 1.0 / hw, 0, hidden, scale,
               HAS_GM=has_mean, HAS_GYM=False, N_IN=len(inbounds), RELU=relu, REDUCE=True, WRITE=False,
               BLOCK_M=block_m, **meta)
        grad_g, (grad_fc1, grad_bn_weight, grad_bn_bias, grad_fc2, grad_fc2_bias) = head_backward(
            grad_logits, grad_h_parts, saved, fc1, bn_weight, running, use_batch_stats, eps, fc2)
        grad_mixed = torch.empty_like(y)
        grad_inbounds = [torch.empty_like(a) for a in inbounds]
        grad_y = None
        if ctx.two_ys:  # y's mean alone reaches y; the mix reaches the y that was mixed (after drop-path)
            grad_y = (grad_g[:, :channels] / hw).to(y.dtype)[:, :, None, None].expand(y.shape)
            grad_g[:, :channels] = 0  # the mix's y, without the share of y's mean
        grid, meta = _map_grid(y)
        launch(_mix_bwd_kernel, grid, grad, grad_mean, out, y, v, w, grad_mixed, grad_g, grad_g, grad_g, fc2,
               *_slots(inbounds, y), *_slots(grad_inbounds, grad_mixed), *_widths(inbounds), channels, hw,
               1.0 / hw, grad_g.stride(0), 1, 1.0, HAS_GM=has_mean, HAS_GYM=True, N_IN=len(inbounds),
               RELU=relu, REDUCE=False, WRITE=True, BLOCK_M=1, **meta)
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
    counts = bn.momentum is not None and bn.num_batches_tracked is not None  # the kernel counts the batch
    use_batch_stats = bn.use_batch_stats(y.shape[0], count=not counts)
    tracked = bn.num_batches_tracked if counts and use_batch_stats else None
    params = (gate.fc1.weight, bn.weight, bn.bias, gate.fc2.weight, gate.fc2.bias)
    relu = type(gate.out_act) is torch.nn.ReLU
    settings = (relu, gate.logit_scale, gate.weights.valid_channels, use_batch_stats,
                (bn.running_mean, bn.running_var, tracked), bn.running_momentum(use_batch_stats), bn.eps)
    means = [m.contiguous() for m in means]
    if torch.is_grad_enabled() and any(t.requires_grad for t in [y, y_mixed, *inbounds, *means, *params]):
        mixed = None if y_mixed is y else y_mixed
        return _GateFn.apply(settings, y, mixed, len(inbounds), *inbounds, *means, *params)
    head, v, w, _ = head_forward(y, means, _channels_last(y), params[0], params[1:3], settings[4], use_batch_stats,
                                 settings[5], bn.eps, params[3], params[4], gate.logit_scale,
                                 gate.weights.valid_channels, for_backward=False)
    out, out_mean = _mix(y_mixed, head, inbounds, relu, reuse_y=y_mixed is y)
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
    running = (torch.zeros(hidden, device=device), torch.ones(hidden, device=device),
               torch.zeros((), dtype=torch.long, device=device))
    settings = (True, 1.0, [channels], True, running, 0.1, 1e-5)
    out, out_mean, _, _ = _GateFn.apply(settings, y, None, 1, a, a.detach().mean((2, 3)), *params)
    torch.autograd.grad(out.sum() + out_mean.sum(), [y, a])
