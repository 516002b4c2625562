"""The Gate-Module: the end of a dense block.

A dense block hands its gate the branch output ``y``, its inbounds ``a_1..a_n`` (the shortcut first, then earlier
block outputs brought to y's shape) and their means over H, W; the gate returns the block output
``act(v * y + sum_k w_k * a_k)`` and its mean. ``v`` (sigmoid) and ``w`` (a softmax over the inbounds, per channel)
come from the SE-like head fc1 -> BatchNorm -> ReLU -> fc2 on the pooled vectors (docs/architecture.md).

Two paths, chosen in one place (:meth:`DenseGate._backend`): the gate's modules and the plain formula (the
reference, which also serves TorchScript, torch.fx, torch.compile, float64 on CPU, autocast on CPU and forward
hooks), or kernels that compute the same in a few calls: on CPU float32 the compiled C++ of ``_kernels.py``, on
CUDA the Triton kernels of ``_triton_kernels.py`` (``_backends.py`` says which a device has).
"""
import math
from typing import Callable, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from . import _backends
from ._runtime import capturing_graph, hook_free, is_compiling

__all__ = ['DenseGate', 'GateBatchNorm', 'GateConv', 'GateWeights', 'add_scaled', 'gate_hidden_channels', 'mix']


def gate_hidden_channels(channels: int, reduction: int) -> int:
    """Width M of the gate's hidden layer: ``ceil(max(C // r, 1) / 8) * 8`` (the rule that matches the paper)."""
    return int(math.ceil(max(channels // reduction, 1) / 8) * 8)


def add_scaled(out: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``out + scale * a``, scale (B, C) broadcast over H, W, one multiply-add per element; an ``a`` narrower
    than ``out`` stands for itself zero-padded (it adds into its first channels; the padding is never made)."""
    width = a.shape[1]
    scale = scale[:, :width, None, None]
    if width == out.shape[1]:
        return torch.addcmul(out, a, scale)
    return torch.cat([torch.addcmul(out[:, :width], a, scale), out[:, width:]], dim=1)


torch.fx.wrap('add_scaled')  # its width test reads the shape; a leaf for torch.fx


def mix(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor]) -> torch.Tensor:
    """``v * y + sum_k w[:, k] * a_k``, v (B, C) and w (B, n, C) broadcast over H, W; an inbound narrower than y
    stands for itself zero-padded."""
    out = y * v[:, :, None, None]
    for k, a in enumerate(inbounds):
        out = add_scaled(out, a, w[:, k])
    return out


@register_notrace_module  # its shape test is python control flow; keep it a leaf for torch.fx
class GateConv(nn.Conv2d):
    """The gate's 1x1 convolution (the parameters of an ``nn.Conv2d``) applied to pooled (B, C) vectors, where it
    is a matrix product; its output times ``output_scale`` (fc2's: the gate's logit scale), in that product."""

    def __init__(self, *args, output_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_scale = float(output_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.output_scale
        if x.dim() == 2:
            if scale == 1.0:
                return F.linear(x, self.weight.flatten(1), self.bias)
            bias = self.bias
            if bias is None:
                return torch.mm(x, self.weight.flatten(1).t()) * scale
            return torch.addmm(bias, x, self.weight.flatten(1).t(), beta=scale, alpha=scale)
        out = self._conv_forward(x, self.weight, self.bias)
        return out if scale == 1.0 else out * scale


@register_notrace_module  # its batch-size check is data dependent; keep it a leaf for torch.fx
class GateBatchNorm(nn.BatchNorm2d):
    """BatchNorm for the gate's pooled vectors, (B, M) or (B, M, 1, 1).

    A single sample in training has one value per channel, which BatchNorm cannot normalise: such a batch is
    normalised with the running statistics (as in eval mode), which it leaves as they are.
    """

    def use_batch_stats(self, batch_size: int, count: bool = True) -> bool:
        """Whether a batch is normalised with its own statistics; if so and ``count``, counts it as BatchNorm does
        (a kernel that counts it itself passes False)."""
        use_batch_stats = self.training and batch_size > 1
        if count and use_batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return use_batch_stats

    def running_momentum(self, use_batch_stats: bool) -> float:
        """The weight of this batch in the running statistics: ``momentum``, or with ``momentum=None`` the
        cumulative average over the batches counted so far (as BatchNorm)."""
        momentum = self.momentum
        if momentum is not None:
            return momentum
        tracked = self.num_batches_tracked
        if not use_batch_stats or tracked is None:
            return 0.0
        return 1.0 / float(tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.use_batch_stats(x.shape[0])
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats,
                            self.running_momentum(use_batch_stats), self.eps)


class GateWeights(nn.Module):
    """Turns the gate's logits into ``v`` (sigmoid) and ``w`` (softmax over the inbounds, per channel).

    A channel that zero-padding created in an inbound (other than the shortcut) gets weight 0, so each channel's
    weights sum to one over the inbounds that really have it. It holds no parameters; it is a module of its own
    so that a forward hook can read ``(v, w)`` on the modules' path (``gate_stats.record_gates`` reads them on
    every path, through :attr:`DenseGate.observer`).
    """

    def __init__(self, channels: int, valid_channels: List[int]):
        super().__init__()
        self.channels = channels
        self.num_inbounds = len(valid_channels)
        self.valid_channels = valid_channels  # per inbound, how many leading channels are real
        self.needs_mask = any(c < channels for c in valid_channels)
        self._mask: Optional[torch.Tensor] = None  # a cache, not state: no buffer in the state dict

    def padding_mask(self, device: torch.device) -> Optional[torch.Tensor]:
        """(n, C) True where an inbound's channel is zero padding; None if there is none. In eager mode it is built
        once per device (outside inference mode, so that training can save it for backward)."""
        if not self.needs_mask:
            return None
        if torch.jit.is_scripting():
            return self._build_mask(device)
        else:
            if is_compiling() or isinstance(device, torch.fx.Proxy):  # traced: the mask is built in the graph
                return self._build_mask(device)
            mask = self._mask
            if mask is None or mask.device != device:
                with torch.inference_mode(False):
                    mask = self._build_mask(device)
                self._mask = mask
            return mask

    def _build_mask(self, device: torch.device) -> torch.Tensor:
        chan = torch.arange(self.channels, device=device)
        valid = torch.tensor(self.valid_channels, device=device)
        return chan >= valid.unsqueeze(1)

    def forward(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """logits: (B, (n + 1) * C), the C logits of v first. Returns v (B, C) and w (B, n, C)."""
        v_logits, w_logits = logits.split([self.channels, self.num_inbounds * self.channels], dim=1)
        w_logits = w_logits.view(-1, self.num_inbounds, self.channels)
        mask = self.padding_mask(logits.device)
        if mask is not None:
            w_logits = w_logits.masked_fill(mask, float('-inf'))  # (n, C) broadcast
        return torch.sigmoid(v_logits), torch.softmax(w_logits, dim=1)


class DenseGate(nn.Module):
    """Gate-Module: ``out = act(v * y + sum_k w_k * a_k)``, (v, w) from the pooled y and inbounds.

    Args:
        channels: C, the block's output channels.
        num_inbounds: n, the number of inbounds (the shortcut plus earlier outputs).
        reduction: r in ``M = ceil(max(C // r, 1) / 8) * 8``.
        valid_channels: for each inbound, how many leading channels are real (the rest is zero padding).
        act_layer: activation between the two 1x1 layers.
        out_act: the block's activation after the mix (None: none).
        logit_scale: fc2's output is multiplied by this before the sigmoid and softmax. Under SGD a logit then
            moves ``logit_scale ** 2`` times as fast (under Adam ``logit_scale`` times): the gates' learning speed,
            with the same parameters (their values are the logits divided by it).
    """

    def __init__(
            self,
            channels: int,
            num_inbounds: int,
            reduction: int,
            valid_channels: List[int],
            act_layer: Type[nn.Module] = nn.ReLU,
            out_act: Optional[nn.Module] = None,
            logit_scale: float = 1.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert len(valid_channels) == num_inbounds
        assert logit_scale > 0, f'logit_scale must be positive, got {logit_scale}'
        self.channels = channels
        self.num_inbounds = num_inbounds
        hidden = gate_hidden_channels(channels, reduction)
        width = (num_inbounds + 1) * channels
        self.fc1 = GateConv(width, hidden, 1, bias=False, **dd)
        self.bn = GateBatchNorm(hidden, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = GateConv(hidden, width, 1, bias=True, output_scale=logit_scale, **dd)
        self.weights = GateWeights(channels, valid_channels)
        self.out_act = nn.Identity() if out_act is None else out_act
        # called as observer(gate, v, w) with every (v, w) computed in eager mode, on either path; not state
        self.observer: Optional[Callable[['DenseGate', torch.Tensor, torch.Tensor], None]] = None

    __jit_unused_properties__ = ['logit_scale']

    @property
    def logit_scale(self) -> float:
        """fc2's output scale (:class:`GateConv`), which every path applies to the logits."""
        return self.fc2.output_scale

    @logit_scale.setter
    def logit_scale(self, value: float) -> None:
        assert value > 0, f'logit_scale must be positive, got {value}'
        self.fc2.output_scale = float(value)

    def mixing_weights(self, y: torch.Tensor, means: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(v, w) through the gate's modules: v (B, C), w (B, n, C), from y and the inbounds' means (B, C) (an
        inbound narrower than y has its mean zero-padded)."""
        g = torch.cat([y.mean((2, 3))] + means, dim=1)
        return self.weights(self.fc2(self.act(self.bn(self.fc1(g)))))  # fc2 scales its output

    def forward(
            self, y: torch.Tensor, inbounds: List[torch.Tensor], means: List[torch.Tensor], y_mixed: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block output ``act(v * y_mixed + sum_k w_k * a_k)`` and its mean over H, W (B, C).

        (v, w) are computed from ``y``; ``y_mixed`` is the y that is mixed (after drop-path, else y itself, which
        it may then overwrite when autograd does not record)."""
        if not torch.jit.is_scripting():
            backend = self._backend(y, inbounds, means)
            if backend is not None:
                out, out_mean, v, w = backend.run_gate(self, y, inbounds, means, y_mixed)
                self._observe(v, w)
                return out, out_mean
        v, w = self.mixing_weights(y, means)
        if not torch.jit.is_scripting():
            self._observe(v, w)
        out = self.out_act(mix(y_mixed, v, w, inbounds))
        return out, out.mean((2, 3))

    @torch.jit.unused
    def _observe(self, v: torch.Tensor, w: torch.Tensor) -> None:
        if self.observer is not None and not is_compiling() and not isinstance(v, torch.fx.Proxy):
            self.observer(self, v, w)

    @torch.jit.unused
    def _backend(self, y: torch.Tensor, inbounds: List[torch.Tensor], means: List[torch.Tensor]):
        """The kernels that stand in for this call (``_kernels`` on CPU, ``_triton_kernels`` on CUDA), or None for
        the modules and the formula. Kernels compute exactly this gate's modules (these types, unhooked), in eager
        mode, on the tensors their ``covers`` takes; the formula stays the reference and the fallback."""
        if isinstance(y, torch.fx.Proxy) or capturing_graph() or _backends.disabled():
            return None
        modules = self._modules
        if not (type(modules['fc1']) is GateConv and type(modules['bn']) is GateBatchNorm
                and type(modules['act']) is nn.ReLU and type(modules['fc2']) is GateConv
                and type(modules['weights']) is GateWeights and type(modules['out_act']) in (nn.ReLU, nn.Identity)
                and all(hook_free(m) for m in modules.values())):
            return None
        for backend in _backends.for_device(y.device):
            if backend.takes_gate(self) and backend.covers(y, inbounds, means):
                return backend
        return None

    @torch.no_grad()
    def set_identity(self, logit: float = 30.0) -> None:
        """Gate that passes ``y + shortcut``: v = sigmoid(logit) ~ 1, all mixing weight on the shortcut, and fc2's
        weight zero, so the gate starts input-independent. With the default logit the deviation from a plain
        residual block is below float32 resolution; a smaller logit keeps the gate trainable."""
        nn.init.zeros_(self.fc2.weight)
        bias = self.fc2.bias.view(self.num_inbounds + 1, self.channels)
        bias.zero_()
        bias[0] = logit / self.logit_scale  # v
        bias[1] = logit / self.logit_scale  # w of the shortcut

    @torch.no_grad()
    def reset_to_random(self) -> None:
        """PyTorch's own init of the gate's layers (v ~ 0.5, w near uniform and input-dependent), fc2's divided by
        the logit scale so that the first logits do not depend on it."""
        for layer in (self.fc1, self.bn, self.fc2):
            layer.reset_parameters()
        self.fc2.weight.div_(self.logit_scale)
        self.fc2.bias.div_(self.logit_scale)
