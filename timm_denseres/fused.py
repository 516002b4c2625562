"""Compiled CPU kernels for the dense block's gate (``csrc/``), used where they build, with the PyTorch operations
of gate.py as their fallback and reference:

- ``gate_mix.cpp``: the end of a dense block, ``act(v * y + sum_k w_k * a_k)`` and its global average in one pass
  over the maps, and the backward in one pass. Eager PyTorch has no operator for a weighted sum of several
  tensors: :func:`timm_denseres.gate.weighted_sum` makes a read-modify-write of the sum per inbound, and in
  backward a gradient pass per inbound; the activation and the global average (which the next N gates read) are
  passes of their own.
- ``gate_head.cpp``: the gate's small layers, from y and the inbounds' means to (v, w), as one call in inference
  and one call each way in training (with the BatchNorm's batch statistics and running-statistics update). As
  PyTorch operations they are ten to twenty calls per block on vectors of a few thousand numbers, whose fixed
  costs outweigh their arithmetic.

For DenseResNet-110's 54 small blocks these are most of its extra time over ResNet-110 (README, *Speed*). The
kernels give the same numbers to 1e-5 (tests/test_fused.py).

The kernels are built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about 15 s on a
2-core machine) and cached by torch (``TORCH_EXTENSIONS_DIR``). Where they cannot be built, with the environment
variable ``TIMM_DENSERES_FUSED=0``, inside :func:`kernel_disabled`, or for inputs they do not cover (not CPU
float32 contiguous NCHW, autocast, torch.fx tracing, TorchScript, torch.compile), :func:`gate_mix`,
:func:`gate_head_eval` and :func:`gate_head_train` return None and the blocks use the PyTorch operations. CUDA runs
the PyTorch operations (or torch.compile's fused code).
"""
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._runtime import autocast_enabled, is_compiling

__all__ = ['gate_head_eval', 'gate_head_train', 'gate_mix', 'kernel_available', 'kernel_disabled']

_LOGGER = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name('csrc') / name for name in ('gate_mix.cpp', 'gate_head.cpp')]
_MAX_INBOUNDS = 64  # kMaxInbounds in the source
# -fno-trapping-math: no floating-point exceptions to keep, so the compiler may turn the selects (ReLU, the
# exp's range clamp) into vector blends and vectorise those loops; the numbers are the same
_CFLAGS = ['-O3', '-fopenmp', '-fno-trapping-math']
_kernel_state: List[Optional[bool]] = [None]  # None: not tried yet; then whether the ops are registered
_disabled: List[bool] = [False]  # kernel_disabled() is active


def _enabled_by_env() -> bool:
    return os.environ.get('TIMM_DENSERES_FUSED', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def kernel_available() -> bool:
    """Whether the compiled ops ``torch.ops.timm_denseres.gate_mix*`` are there; builds them on the first call
    (once per process; torch caches the build on disk). A failed build warns once and is not tried again."""
    if _kernel_state[0] is None:
        _kernel_state[0] = _load_kernel()
    return bool(_kernel_state[0])


@contextmanager
def kernel_disabled() -> Iterator[None]:
    """Within it, the dense blocks use the PyTorch operations instead of the kernel (to compare the two)."""
    saved = _disabled[0]
    _disabled[0] = True
    try:
        yield
    finally:
        _disabled[0] = saved


def _load_kernel() -> bool:
    if not _enabled_by_env():
        return False
    if hasattr(torch.ops.timm_denseres, 'gate_mix'):  # registered by another copy of this module
        return True
    try:
        from torch.utils.cpp_extension import load
        _LOGGER.info('building the fused gate kernels %s (once; torch caches them)', [p.name for p in _SOURCES])
        # AVX2 where torch itself runs its AVX2 (or AVX-512) kernels; the name keeps the two builds apart in a
        # cache that several machines share
        avx2 = torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')
        load(name='timm_denseres_gate_mix' + ('_avx2' if avx2 else ''), sources=[str(p) for p in _SOURCES],
             extra_cflags=_CFLAGS + (['-mavx2', '-mfma'] if avx2 else []), extra_ldflags=['-fopenmp'],
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, no write access to the cache, ...
        warnings.warn(
            f'timm_denseres: the fused CPU gate kernel could not be built ({type(e).__name__}: '
            f'{str(e).strip().splitlines()[-1] if str(e).strip() else "no message"}); the dense blocks use PyTorch '
            f'operations instead (same numbers, slower on CPU). Set TIMM_DENSERES_FUSED=0 to skip the attempt.')
        return False
    return True


class _GateMixFn(torch.autograd.Function):
    """The kernel as one autograd node; it saves its inputs and its output (which the history keeps anyway)."""

    @staticmethod
    def forward(ctx, relu: bool, y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, *inbounds: torch.Tensor):
        out, out_mean = torch.ops.timm_denseres.gate_mix(y, v, w, list(inbounds), relu, False)
        ctx.relu = relu
        ctx.save_for_backward(out, y, v, w, *inbounds)
        return out, out_mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor]):
        out, y, v, w, *inbounds = ctx.saved_tensors
        grad = torch.zeros_like(out) if grad is None else grad.contiguous()
        grad_mean = None if grad_mean is None else grad_mean.contiguous()
        grads = torch.ops.timm_denseres.gate_mix_backward(grad, grad_mean, out, y, v, w, inbounds, ctx.relu)
        return (None, *grads)


def _covered(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor]) -> bool:
    # runs once per block and forward: plain attribute tests, one pass over the inbounds
    if not y.is_cpu or y.dim() != 4 or len(inbounds) > _MAX_INBOUNDS or autocast_enabled('cpu'):
        return False
    batch, channels, height, width = y.shape
    if v.shape != (batch, channels) or w.shape != (batch, len(inbounds), channels):
        return False
    for t in (y, v, w):
        if t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu:
            return False
    for a in inbounds:
        if (a.dtype != torch.float32 or not a.is_contiguous() or not a.is_cpu or a.dim() != 4
                or a.shape[0] != batch or a.shape[1] > channels or a.shape[2] != height or a.shape[3] != width):
            return False
    return True


def gate_mix(
        y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor], relu: bool,
        reuse_y: bool = False,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(act(v * y + sum_k w[:, k] * a_k), its mean over H, W)`` by the compiled kernel (act: ReLU if ``relu``),
    or None where the kernel does not apply (see the module docstring); the caller then uses PyTorch operations.
    v (B, C), w (B, n, C); an inbound narrower than y stands for itself zero-padded. ``reuse_y``: y is a
    temporary nothing reads afterwards, so without autograd the result is written into it."""
    if (_disabled[0] or isinstance(y, torch.fx.Proxy) or is_compiling()
            or not _covered(y, v, w, inbounds)):
        return None
    if not kernel_available():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in [y, v, w] + inbounds):
        return _GateMixFn.apply(relu, y, v, w, *inbounds)
    return torch.ops.timm_denseres.gate_mix(y, v, w, inbounds, relu, reuse_y)


def gate_head_eval(
        y: torch.Tensor, pooled: List[torch.Tensor],
        folded: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The gate's (v, w) in inference by the compiled kernel, from y, the inbounds' means and the folded
    parameters ``(w1, b1, w2, b2)`` of :func:`timm_denseres.gate._fold_eval_head`; None where it does not apply
    (the caller then runs the same two matrix products as PyTorch operations)."""
    if _disabled[0] or not y.is_cpu or y.dtype != torch.float32 or y.dim() != 4 or not y.is_contiguous():
        return None
    if any(t.dtype != torch.float32 for t in list(pooled) + list(folded)) or not kernel_available():
        return None
    return torch.ops.timm_denseres.gate_head_eval(y, pooled, *folded)


def _gate_head_train_op(use_batch_stats: bool, stats: Tuple[torch.Tensor, torch.Tensor, float, float],
                        valid_channels: List[int], y: torch.Tensor, pooled: List[torch.Tensor],
                        params: Tuple[torch.Tensor, ...]) -> List[torch.Tensor]:
    """``torch.ops.timm_denseres.gate_head_train`` from :func:`gate_head_train`'s arguments: [v, w, saved...]."""
    fc1, bn_weight, bn_bias, fc2, fc2_bias = params
    running_mean, running_var, momentum, eps = stats
    return torch.ops.timm_denseres.gate_head_train(
        y, pooled, fc1, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps, fc2, fc2_bias,
        valid_channels)


class _GateHeadTrainFn(torch.autograd.Function):
    """The gate's small layers from y and the inbounds' means to (v, w) as one autograd node over the compiled
    ``gate_head_train`` and its backward. Inputs after the two flags: y, the n pooled means, then fc1's weight,
    the BatchNorm's weight and bias, fc2's weight and bias (the parameters autograd gives gradients to)."""

    @staticmethod
    def forward(ctx, use_batch_stats: bool, stats: Tuple[torch.Tensor, torch.Tensor, float, float],
                valid_channels: List[int], y: torch.Tensor, *rest: torch.Tensor):
        pooled, params = list(rest[:-5]), rest[-5:]
        fc1, bn_weight, _, fc2, _ = params
        v, w, *saved = _gate_head_train_op(use_batch_stats, stats, valid_channels, y, pooled, params)
        ctx.use_batch_stats, ctx.y_shape, ctx.fc_shapes = use_batch_stats, y.shape, (fc1.shape, fc2.shape)
        ctx.save_for_backward(v, w, *saved, fc1, bn_weight)
        return v, w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: Optional[torch.Tensor], grad_w: Optional[torch.Tensor]):
        grad_y_mean, *grads = torch.ops.timm_denseres.gate_head_train_backward(
            grad_v, grad_w, *ctx.saved_tensors, ctx.use_batch_stats)
        batch, channels, height, width = ctx.y_shape
        # the mean's gradient is the (B, C) gradient broadcast over H, W: a view, which autograd adds in place into
        # the full-size gradient y gets from the weighted sum
        grad_y = grad_y_mean.div_(height * width).view(batch, channels, 1, 1).expand(ctx.y_shape)
        *grad_pooled, grad_fc1, grad_bn_weight, grad_bn_bias, grad_fc2, grad_fc2_bias = grads
        fc1_shape, fc2_shape = ctx.fc_shapes
        return (None, None, None, grad_y, *grad_pooled, grad_fc1.view(fc1_shape), grad_bn_weight, grad_bn_bias,
                grad_fc2.view(fc2_shape), grad_fc2_bias)


def gate_head_train(
        y: torch.Tensor, pooled: List[torch.Tensor], params: Tuple[torch.Tensor, ...],
        stats: Tuple[torch.Tensor, torch.Tensor, float, float], use_batch_stats: bool, valid_channels: List[int],
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The gate's (v, w) through its own BatchNorm (training, or eval mode with autograd) by the compiled kernel,
    differentiable, from y, the inbounds' means, ``params`` (fc1's weight, the BatchNorm's weight and bias, fc2's
    weight and bias) and ``stats`` (the BatchNorm's running mean and variance, which it updates with
    ``use_batch_stats``; momentum; eps). None where the kernel does not apply: the caller then runs
    :class:`timm_denseres.gate._GateHeadFn` (PyTorch operations)."""
    if _disabled[0] or not y.is_cpu or y.dim() != 4 or autocast_enabled('cpu'):
        return None
    tensors = [y] + list(pooled) + list(params) + list(stats[:2])
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors) or not kernel_available():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in [y] + list(pooled) + list(params)):
        return _GateHeadTrainFn.apply(use_batch_stats, stats, valid_channels, y, *pooled, *params)
    v, w, *_ = _gate_head_train_op(use_batch_stats, stats, valid_channels, y, pooled, params)
    return v, w
