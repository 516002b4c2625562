"""The compiled CPU kernels of the gate (``csrc/``): loading, and their autograd nodes.

- ``gate_head.cpp``: the gate's small layers, from y and the inbounds' means to (v, w), as one call in inference
  and one call each way in training (with the BatchNorm's batch statistics and running-statistics update);
- ``gate_mix.cpp``: the end of a dense block, ``act(v * y + sum_k w_k * a_k)`` and its mean over H, W, in one
  pass over the maps, and its backward in one pass.

A backend of the gate (``_backends.py``): which inputs they take is decided in one place,
:meth:`timm_denseres.gate.DenseGate._backend`, with :func:`takes_gate` and :func:`covers`; everything else runs the
gate's modules (the reference). The kernels are built on
first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into torch's extension cache; a build
of the same sources that is already there is loaded as it is, also from a read-only cache.
"""
import hashlib
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._runtime import autocast_enabled, warn_line

__all__ = ['covers', 'takes_gate', 'run_gate', 'gate_head', 'gate_weights', 'gate_mix', 'kernel_available']

_SOURCES = [Path(__file__).with_name('csrc') / name for name in ('gate_mix.cpp', 'gate_head.cpp')]
_MAX_INBOUNDS = 64  # kMaxInbounds in gate_mix.cpp
# -fno-trapping-math: no floating-point exceptions to keep, so the compiler may turn the selects (ReLU, the
# exp's range clamp) into vector blends and vectorise those loops; the numbers are the same
_CFLAGS = ['-O3', '-fopenmp', '-fno-trapping-math']
_state = {'loaded': None}  # None until tried, then whether the ops are registered


def _enabled_by_env() -> bool:
    return os.environ.get('TIMM_DENSERES_FUSED', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def kernel_available() -> bool:
    """Whether the compiled ops ``torch.ops.timm_denseres.*`` are there; loads (or builds) them on the first call.
    A failed build warns once and is not tried again in this process."""
    if _state['loaded'] is None:
        _state['loaded'] = _load()
    return bool(_state['loaded'])


@contextmanager
def _torch_build_logs_quiet() -> Iterator[None]:
    # torch.utils.cpp_extension logs warnings at import on a machine without CUDA ("No CUDA runtime is found") and
    # about compilers it does not know; neither says anything about these CPU kernels (a failed build says why)
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _cpp_extension():
    with _torch_build_logs_quiet():
        import torch.utils.cpp_extension as cpp_extension
    return cpp_extension


def _build_name() -> Tuple[str, List[str]]:
    """The build's name and compiler flags. The name holds a hash of the sources and flags, so a build in the
    cache is only ever loaded by the code it was built from (another version or checkout builds its own), and
    AVX2 where torch itself runs its AVX2 (or AVX-512) kernels."""
    avx2 = torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')
    cflags = _CFLAGS + (['-mavx2', '-mfma'] if avx2 else [])
    digest = hashlib.sha256(' '.join(cflags).encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    return f'timm_denseres_kernels_{digest.hexdigest()[:12]}', cflags


def _failure_cause(error: Exception) -> str:
    """The lines of a build error that name its cause (the compiler's errors), not ninja's last words."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if 'error' in line.lower() or 'not found' in line.lower()
              or 'no such file' in line.lower()]
    causes = [line for line in causes if not line.startswith('ninja: build stopped')]
    return '; '.join((causes or lines or ['no message'])[:3])


def _load() -> bool:
    if not _enabled_by_env():
        return False
    if hasattr(torch.ops.timm_denseres, 'gate_mix'):  # registered by another copy of this module
        return True
    cpp_extension = _cpp_extension()
    name, cflags = _build_name()
    try:  # the build directory is made here already: an unwritable cache fails here
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        library = build_dir / f'{name}.so'
        if library.is_file():
            torch.ops.load_library(str(library))  # a finished build of these sources: no lock, nothing to say
            return True
        print(f'timm_denseres: building the CPU gate kernels into {build_dir} (once; 15-40 s on 2 cores)',
              file=sys.stderr)
        with _torch_build_logs_quiet():
            cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=cflags,
                               extra_ldflags=['-fopenmp'], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, no write access to the cache, ...
        warn_line(
            f'timm_denseres: the CPU gate kernels could not be built ({type(e).__name__}: {_failure_cause(e)}); '
            f'the gates use PyTorch operations instead (same numbers, slower on CPU). Set TIMM_DENSERES_FUSED=0 '
            f'to skip the attempt.')
        return False
    return True


def takes_gate(gate) -> bool:
    """Whether the kernels take this gate's parameters: float32, contiguous, fc1 without a bias."""
    fc1, bn, fc2 = gate.fc1, gate.bn, gate.fc2
    params = (fc1.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, fc2.weight, fc2.bias)
    return fc1.bias is None and all(p is not None and p.dtype == torch.float32 and p.is_contiguous() for p in params)


def covers(y: torch.Tensor, inbounds: List[torch.Tensor], means: List[torch.Tensor]) -> bool:
    """Whether the kernels take these tensors: CPU float32 contiguous NCHW, inbounds as wide as y or narrower, no
    autocast; loads the kernels on the first call that needs them."""
    if (not y.is_cpu or y.dtype != torch.float32 or y.dim() != 4 or not y.is_contiguous()
            or len(inbounds) > _MAX_INBOUNDS or autocast_enabled('cpu')):
        return False
    batch, channels, height, width = y.shape
    for a in inbounds:
        if (a.dtype != torch.float32 or not a.is_cpu or not a.is_contiguous() or a.dim() != 4 or a.shape[0] != batch
                or a.shape[1] > channels or a.shape[2] != height or a.shape[3] != width):
            return False
    for m in means:
        if m.dtype != torch.float32 or not m.is_contiguous() or m.shape != (batch, channels):
            return False
    return kernel_available()


class _GateMixFn(torch.autograd.Function):
    """The block's end as one autograd node; it saves its inputs and its output (which the history keeps)."""

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


def gate_mix(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor], relu: bool,
             reuse_y: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(act(v * y + sum_k w[:, k] * a_k), its mean over H, W)``, act ReLU if ``relu``; an inbound narrower than
    y stands for itself zero-padded. ``reuse_y``: nothing reads y afterwards, so without autograd the result is
    written into it."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in [y, v, w] + inbounds):
        return _GateMixFn.apply(relu, y, v, w, *inbounds)
    return torch.ops.timm_denseres.gate_mix(y, v, w, inbounds, relu, reuse_y)


class _GateHeadFn(torch.autograd.Function):
    """The gate's small layers from y and the inbounds' means to (v, w) as one autograd node. Inputs after the
    settings: y, the n means, then fc1's weight, the BatchNorm's weight and bias, fc2's weight and bias."""

    @staticmethod
    def forward(ctx, use_batch_stats: bool, stats: Tuple[torch.Tensor, torch.Tensor, float, float],
                valid_channels: List[int], y: torch.Tensor, *rest: torch.Tensor):
        means, (fc1, bn_weight, bn_bias, fc2, fc2_bias) = list(rest[:-5]), rest[-5:]
        running_mean, running_var, momentum, eps = stats
        v, w, *saved = torch.ops.timm_denseres.gate_head_train(
            y, means, fc1, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps, fc2,
            fc2_bias, valid_channels)
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
        # the full-size gradient y gets from the mix
        grad_y = grad_y_mean.div_(height * width).view(batch, channels, 1, 1).expand(ctx.y_shape)
        *grad_means, grad_fc1, grad_bn_weight, grad_bn_bias, grad_fc2, grad_fc2_bias = grads
        fc1_shape, fc2_shape = ctx.fc_shapes
        return (None, None, None, grad_y, *grad_means, grad_fc1.view(fc1_shape), grad_bn_weight, grad_bn_bias,
                grad_fc2.view(fc2_shape), grad_fc2_bias)


def gate_head(y: torch.Tensor, means: List[torch.Tensor], params: Tuple[torch.Tensor, ...],
              stats: Tuple[torch.Tensor, torch.Tensor, float, float], use_batch_stats: bool,
              valid_channels: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gate's (v, w) from y and the inbounds' means. ``params``: fc1's weight, the BatchNorm's weight and bias,
    fc2's weight and bias; ``stats``: the BatchNorm's running mean and variance (updated with
    ``use_batch_stats``), momentum, eps; ``valid_channels``: each inbound's real channels (the rest is padding)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in [y] + means + list(params)):
        return _GateHeadFn.apply(use_batch_stats, stats, valid_channels, y, *means, *params)
    fc1, bn_weight, bn_bias, fc2, fc2_bias = params
    running_mean, running_var, momentum, eps = stats
    if use_batch_stats:  # training without autograd: the batch statistics, and their running update
        v, w, *_ = torch.ops.timm_denseres.gate_head_train(
            y, means, fc1, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps, fc2, fc2_bias,
            valid_channels)
        return v, w
    return torch.ops.timm_denseres.gate_head_eval(
        y, means, fc1, bn_weight, bn_bias, running_mean, running_var, eps, fc2, fc2_bias, valid_channels)


def gate_weights(gate, y: torch.Tensor, means: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gate's (v, w) by the compiled head, its BatchNorm's running statistics updated as the module would."""
    bn = gate.bn
    use_batch_stats = bn.use_batch_stats(y.shape[0])
    fc2_weight, fc2_bias = gate.fc2.weight, gate.fc2.bias
    if gate.logit_scale != 1.0:  # the kernel's logits are then fc2's times the scale; autograd scales back
        fc2_weight, fc2_bias = fc2_weight * gate.logit_scale, fc2_bias * gate.logit_scale
    return gate_head(
        y, means, (gate.fc1.weight, bn.weight, bn.bias, fc2_weight, fc2_bias),
        (bn.running_mean, bn.running_var, bn.running_momentum(use_batch_stats), bn.eps), use_batch_stats,
        gate.weights.valid_channels)


def run_gate(gate, y: torch.Tensor, inbounds: List[torch.Tensor], means: List[torch.Tensor],
             y_mixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block output, its mean, v and w: the compiled head, then the compiled mix (into y_mixed, when nothing
    reads it afterwards)."""
    v, w = gate_weights(gate, y, means)
    relu = type(gate.out_act) is torch.nn.ReLU
    out, out_mean = gate_mix(y_mixed, v, w, inbounds, relu, reuse_y=not torch.is_grad_enabled())
    return out, out_mean, v, w
