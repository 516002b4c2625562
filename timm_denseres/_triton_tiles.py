"""Building blocks of the gate's Triton kernels (``_triton_kernels.py``, ``_triton_head.py``): tiles of maps and
rows, reductions, and the launcher that counts launches (the operation counts of tools/benchmark.py read it)."""
from typing import Tuple

import triton
import triton.language as tl

launches = [0]  # kernel launches so far in this process (the operation counts of tools/benchmark.py read it)
launching = [False]  # True during a launch
# Given with every launch: multiply-adds fused, Triton 3.8's default. Triton 3.9 warns when it is left unset, and
# 3.10 changes the default
COMPILE_OPTIONS = dict(enable_fp_fusion=True)


# Sums through tl.reduce with triton's own combine function, as tl.sum does: the interpreter sums with numpy where
# it sees that function (any other it applies pair by pair, about 100x slower). tl.sum itself is a jit function
# made when triton is imported, which the interpreter cannot call if that was before TRITON_INTERPRET=1 was set
@triton.jit
def reduce_sum(x, axis):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def map_offsets(b, c, hw, channels, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a (BLOCK_C, BLOCK_HW) tile of sample b in a map with ``channels`` channels."""
    if CHANNELS_LAST:
        return b * HW * channels + hw[None, :] * channels + c[:, None]
    else:
        return b * channels * HW + c[:, None] * HW + hw[None, :]


@triton.jit
def map_tile(A, channels, b, c, hw, mask_hw, HW, CHANNELS_LAST: tl.constexpr):
    """An inbound's tile in float32 (zero where it has no such channel) and its offsets and mask."""
    offs = map_offsets(b, c, hw, channels, HW, CHANNELS_LAST)
    mask = (c[:, None] < channels) & mask_hw[None, :]
    return tl.load(A + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def row(P, b, k, rows, C, c, mask_c):
    """Row k of sample b of a (B, rows, C) tensor, in float32."""
    return tl.load(P + (b * rows + k) * C + c, mask=mask_c, other=0.0).to(tl.float32)


@triton.jit
def column(P, row_stride, b, k, C, c, mask_c, scale):
    """Row k of sample b of a (B, rows, C) tensor (row_stride = rows * C) as a (BLOCK_C, 1) float32 column."""
    return (tl.load(P + b * row_stride + k * C + c, mask=mask_c, other=0.0).to(tl.float32) * scale)[:, None]


@triton.jit
def columns(P, row_stride, b, first, C, c, mask_c, scale, N: tl.constexpr):
    """Rows first .. first + N - 1 (N <= 8) of sample b as columns (:func:`column`), zeros in the slots past N."""
    r0 = column(P, row_stride, b, first, C, c, mask_c, scale)
    r1 = r0 * 0.0
    r2 = r1
    r3 = r1
    r4 = r1
    r5 = r1
    r6 = r1
    r7 = r1
    if N > 1:
        r1 = column(P, row_stride, b, first + 1, C, c, mask_c, scale)
    if N > 2:
        r2 = column(P, row_stride, b, first + 2, C, c, mask_c, scale)
    if N > 3:
        r3 = column(P, row_stride, b, first + 3, C, c, mask_c, scale)
    if N > 4:
        r4 = column(P, row_stride, b, first + 4, C, c, mask_c, scale)
    if N > 5:
        r5 = column(P, row_stride, b, first + 5, C, c, mask_c, scale)
    if N > 6:
        r6 = column(P, row_stride, b, first + 6, C, c, mask_c, scale)
    if N > 7:
        r7 = column(P, row_stride, b, first + 7, C, c, mask_c, scale)
    return r0, r1, r2, r3, r4, r5, r6, r7


# Block sizes on the host, per launch: plain integer arithmetic. triton.next_power_of_2 and triton.cdiv are
# constexpr functions, whose wrapper costs microseconds a call from Python, about twenty times a gate's step
def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    launches[0] += 1
    launching[0] = True  # the interpreter runs PyTorch operations of its own; an operation count leaves them out
    try:
        kernel[grid](*args, **meta, **COMPILE_OPTIONS)
    finally:
        launching[0] = False
