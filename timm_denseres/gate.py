"""The DenseResNet Gate-Module and the helpers that bring earlier block outputs to a block's shape.

A dense block computes ``x_i = v * y + sum_k w_k * a_k`` where ``y`` is the block's branch output, ``a_1`` its
shortcut and ``a_2..a_n`` earlier block outputs adjusted to ``y``'s shape. The gate is SE-like: it only looks at
global-average-pooled vectors, so it adds few parameters and FLOPs (see ../shared/denseresnet.md).

Speed (see scripts/benchmark.py, README "Speed"): on CPU the gate is memory bound, so the eager path avoids
full-size temporaries and passes over the feature maps: the weighted sum accumulates in place (in inference into
the branch output) and has a hand-written backward (:class:`_WeightedSumFn`), pooling is a sum whose gradient is a
broadcast view, the gate's small layers run as one autograd node (:class:`_GateHeadFn`; in inference as two
matrix products with the BatchNorm folded in, :func:`_eval_head_forward`), and the ceil-mode 2x2
pool of the history runs as a depthwise convolution (strided adds in inference). All of these give the numbers
of the plain formula to 1e-5 (tests/test_gate_fast.py). Under TorchScript and torch.compile the gate is the
plain formula over its modules. On CPU the blocks run the weighted sum, their activation and the output's mean,
and the gate's small layers (forward and backward), in compiled kernels where they build (fused.py); these
functions are their fallback and reference.
"""
import math
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.autograd.function import once_differentiable

from ._runtime import autocast_enabled, hook_free, is_compiling
from .fused import gate_head_eval, gate_head_train

__all__ = [
    'DenseGate', 'GateBatchNorm', 'GateConv', 'GateWeights', 'gate_hidden_channels', 'adjust_inbound', 'avg_pool_2x2',
    'global_avg_pool', 'pad_channels', 'weighted_sum',
]


def gate_hidden_channels(channels: int, reduction: int) -> int:
    """Width M of the gate's hidden layer: ``ceil(max(C // r, 1) / 8) * 8`` (the rule that matches the paper)."""
    return int(math.ceil(max(channels // reduction, 1) / 8) * 8)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2, ceil_mode=True)``. In eager mode on CPU, for even H and W, it runs faster than
    PyTorch's CPU average pool: without autograd as two strided adds over contiguous row pairs, then column pairs
    (to within 1 ulp: the four values are added in another order), and with autograd as a depthwise convolution
    with weights 1/4 (the same numbers; two to four times faster forward and backward). A leaf for torch.fx (its
    test is on shapes)."""
    if torch.jit.is_scripting():
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    else:
        if (is_compiling() or x.device.type != 'cpu' or not x.is_floating_point()
                or x.shape[2] % 2 == 1 or x.shape[3] % 2 == 1):
            return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        if x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad):
            batch, channels, height, width = x.shape
            row_pairs = x.view(batch, channels, height // 2, 2, width)
            rows = row_pairs[:, :, :, 0] + row_pairs[:, :, :, 1]
            return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)
        weight = x.new_full((x.shape[1], 1, 2, 2), 0.25)
        with torch.autocast('cpu', enabled=False):  # keep x's dtype, as the pool does
            return F.conv2d(x, weight, stride=2, groups=x.shape[1])


torch.fx.wrap('avg_pool_2x2')


def adjust_inbound(x: torch.Tensor, in_chs: int, channels: int, pool: bool, pad: bool = True) -> torch.Tensor:
    """Bring an earlier block output (``in_chs`` wide) to the next stage's shape: ceil-mode 2x2 average pool,
    then zero-pad (or cut) the channels to ``channels``. Parameter free, so the identity path survives.
    The widths are static ints so that torch.fx can trace it.

    ``pad=False`` leaves a narrower output narrow: its missing channels are zeros, which :func:`weighted_sum` and
    :meth:`DenseGate.mix` skip (they add nothing), so the padding is neither written nor read."""
    if pool:
        x = avg_pool_2x2(x)
    if in_chs < channels:
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, channels - in_chs))
    elif in_chs > channels:
        x = x[:, :channels]
    return x


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``x`` (a (B, c) vector or a (B, c, H, W) map) to ``channels``; ``x`` itself if it is
    that wide already."""
    missing = channels - x.shape[1]
    if missing <= 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, missing])


torch.fx.wrap('pad_channels')  # its width test reads the shape; a leaf for torch.fx


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) means, as a sum then a division: the same numbers as ``x.mean((2, 3))``, but the
    gradient is the (B, C) gradient *expanded* (a view), which autograd adds in place into the full-size gradient
    that x gets from the weighted sum. ``mean``'s backward would fill a new full-size tensor. Without autograd it
    is ``mean`` itself (one operation)."""
    if not torch.is_grad_enabled():
        return x.mean((2, 3))
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3])


# ---------------------------------------------------------------------------------------------------------------
# the weighted sum v * y + sum_k w_k * a_k


def _common_dtype(tensors: List[torch.Tensor]) -> torch.dtype:
    """The dtype the out-of-place formula would give (they differ only under autocast)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def weighted_sum(
        y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor], inplace: bool = False,
) -> torch.Tensor:
    """``v * y + sum_k w[:, k] * a_k`` with v (B, C) and w (B, n, C) broadcast over H, W, accumulated in place into
    one tensor: out-of-place ops would allocate (and fill) one full-size temporary per inbound. One multiply
    per element for v, one multiply-add per element per inbound. Autograd can differentiate it as it is.
    An inbound narrower than y (``c < C`` channels) stands for itself zero-padded to C: it is added into the
    first c channels only.

    ``inplace``: accumulate into ``y`` itself (when the dtypes allow it), as timm's residual blocks add their
    shortcut into the branch output; only for a ``y`` that nothing else reads afterwards and autograd does not
    record. It saves a full-size allocation, which on CPU costs more than the arithmetic (page faults)."""
    batch, channels = v.shape[0], v.shape[1]
    dtype = _common_dtype([y, v, w] + inbounds)
    scale = v.to(dtype).view(batch, channels, 1, 1)
    out = y.mul_(scale) if inplace and y.dtype == dtype else torch.mul(y, scale)
    w_k = w.view(batch, w.shape[1], channels, 1, 1).unbind(1)
    for k, a in enumerate(inbounds):
        width = a.shape[1]
        if width < channels:  # the channels past an inbound's width are zeros: they add nothing
            out.narrow(1, 0, width).addcmul_(a, w_k[k].narrow(1, 0, width))
        else:
            out = out.addcmul_(a, w_k[k])  # reassigned: a tracer that drops unused results must keep it
    return out


def _scaled_grads(
        grad: torch.Tensor, pairs: List[Tuple[torch.Tensor, torch.Tensor, bool, bool]],
) -> List[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """Gradients of ``sum_k s_k * x_k`` (each s_k (B, C) broadcast over H, W) given its gradient ``grad``:
    ``grad * s_k`` for x_k and ``sum_hw(grad * x_k)`` (B, C) for s_k, where wanted. ``pairs``: (x_k, s_k,
    x_k needs a gradient, s_k needs one). An x_k narrower than ``grad`` (c channels) stands for itself
    zero-padded: its gradient is c wide, and s_k's gradient is 0 past channel c.

    Each full-width pair takes one fused kernel: BatchNorm's backward in eval mode, with mean 0, variance 1 (eps 0:
    the inverse std is exactly 1) and weight s_k, over the B*C (sample, channel) pairs as its channels, returns
    exactly ``grad * s_k`` as the input gradient and ``sum(grad * x_k)`` as the weight gradient, in one pass.
    Elementwise ops would take three passes over the maps (product, sum, product) and a temporary; they remain
    the fallback for mixed dtypes (autocast), channels_last maps and narrow inbounds (a strided slice of grad).
    """
    batch, channels, height, width = grad.shape
    flat = batch * channels
    fused = grad.is_contiguous()
    if fused:
        grad_flat = grad.view(1, flat, height, width)
        mean, var = grad.new_zeros(flat), grad.new_ones(flat)
    out: List[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []
    for x, scale, need_x, need_scale in pairs:
        grad_x = grad_scale = None
        x_chs = x.shape[1]
        if x_chs == channels and fused and x.is_contiguous() and grad.dtype == x.dtype == scale.dtype:
            grad_x, grad_scale, _ = torch.ops.aten.native_batch_norm_backward(
                grad_flat, x.view(1, flat, height, width), scale.reshape(flat), mean, var, None, None, False, 0.0,
                [need_x, need_scale, False])
            grad_x = grad_x.view(x.shape) if need_x else None
            grad_scale = grad_scale.view(batch, channels) if need_scale else None
        else:
            grad_part, scale = grad.narrow(1, 0, x_chs), scale.narrow(1, 0, x_chs)
            buf = None
            if need_scale:  # the product for the sum goes into the buffer that then takes x's gradient
                buf = torch.mul(grad_part, x)
                grad_scale = pad_channels(buf.sum((2, 3)), channels)
            if need_x:
                scale = scale.reshape(batch, x_chs, 1, 1)
                grad_x = torch.mul(grad_part, scale) if buf is None else torch.mul(grad_part, scale, out=buf)
        out.append((grad_x, grad_scale))
    return out


class _WeightedSumFn(torch.autograd.Function):
    """:func:`weighted_sum` with a backward that makes one fused pass per input (:func:`_scaled_grads`) and
    allocates only the gradients it returns (autograd's own backward of the in-place chain takes three passes and
    a temporary per input). It saves only its inputs: the inbounds are history entries that the network holds
    anyway; the branch output ``y`` is the one extra."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, *inbounds: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, v, w, *inbounds)
        return weighted_sum(y, v, w, list(inbounds))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, v, w, *inbounds = ctx.saved_tensors
        need_y, need_v, need_w, *need_inbounds = ctx.needs_input_grad
        pairs = [(y, v, need_y, need_v)] + [(a, w_k, need_a, need_w)
                                            for a, w_k, need_a in zip(inbounds, w.unbind(1), need_inbounds)]
        (grad_y, grad_v), *grads = _scaled_grads(grad, pairs)
        grad_w = torch.stack([g for _, g in grads], 1) if need_w else None
        return grad_y, grad_v, grad_w, *[g for g, _ in grads]


def weighted_sum_lean_backward(
        y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor]) -> torch.Tensor:
    """:func:`weighted_sum`, through :class:`_WeightedSumFn` when autograd records."""
    if torch.is_grad_enabled():
        return _WeightedSumFn.apply(y, v, w, *inbounds)
    return weighted_sum(y, v, w, inbounds)


torch.fx.wrap('weighted_sum_lean_backward')  # a leaf for torch.fx, so traced models keep the lean backward


# ---------------------------------------------------------------------------------------------------------------
# the gate's small layers as one autograd node


def _gate_head_forward(gate: 'DenseGate', y: torch.Tensor, pooled: List[torch.Tensor], use_batch_stats: bool):
    """pool(y), cat, fc1, BatchNorm, ReLU, fc2, then (v, w): the operations of the gate's modules, called
    directly. Returns (v, w) and what the backward needs."""
    g = torch.cat([global_avg_pool(y)] + pooled, dim=1)
    w1 = gate.fc1.weight.flatten(1)
    h = F.linear(g, w1)
    bn = gate.bn
    h_norm, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        h, bn.weight, bn.bias, bn.running_mean, bn.running_var, use_batch_stats, bn.running_momentum(), bn.eps)
    r = torch.relu_(h_norm)
    w2 = gate.fc2.weight.flatten(1)
    logits = F.linear(r, w2, gate.fc2.bias)
    v, w = gate.weights(logits)  # sigmoid and masked softmax: no hook on it, or this path is not taken
    return v, w, (g, w1, h, r, w2, save_mean, save_invstd)


class _GateHeadFn(torch.autograd.Function):
    """The whole gate from y and the inbounds' pooled vectors to (v, w) as one autograd node with a hand-written
    backward. The gate works on (B, C) vectors, so its cost is the number of operations, not their size: as
    modules it makes about twenty autograd nodes per block, each with its own dispatch and bookkeeping."""

    @staticmethod
    def forward(ctx, gate: 'DenseGate', use_batch_stats: bool, y: torch.Tensor, *rest: torch.Tensor):
        pooled = list(rest[:gate.num_inbounds])
        v, w, saved = _gate_head_forward(gate, y, pooled, use_batch_stats)
        ctx.gate, ctx.use_batch_stats, ctx.y_shape = gate, use_batch_stats, y.shape
        ctx.save_for_backward(v, w, *saved)
        return v, w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: Optional[torch.Tensor], grad_w: Optional[torch.Tensor]):
        gate = ctx.gate
        bn = gate.bn
        v, w, g, w1, h, r, w2, save_mean, save_invstd = ctx.saved_tensors
        batch = v.shape[0]
        grad_v = torch.zeros_like(v) if grad_v is None else grad_v
        grad_w = torch.zeros_like(w) if grad_w is None else grad_w
        grad_logits = torch.cat([
            torch.ops.aten.sigmoid_backward(grad_v, v),
            torch.ops.aten._softmax_backward_data(grad_w, w, 1, w.dtype).reshape(batch, -1)], dim=1)
        grad_w2 = torch.mm(grad_logits.t(), r)
        grad_b2 = grad_logits.sum(0)
        grad_r = torch.ops.aten.threshold_backward(torch.mm(grad_logits, w2), r, 0)
        grad_h, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward(
            grad_r, h, bn.weight, bn.running_mean, bn.running_var, save_mean, save_invstd, ctx.use_batch_stats,
            bn.eps, [True, True, True])
        grad_w1 = torch.mm(grad_h.t(), g)
        grad_g = torch.mm(grad_h, w1)
        y_shape = ctx.y_shape
        # the mean's gradient is the (B, C) gradient broadcast over H, W (a view, as global_avg_pool's)
        grad_y = (grad_g[:, :gate.channels] / (y_shape[2] * y_shape[3])).view(batch, -1, 1, 1).expand(y_shape)
        grad_pooled = grad_g[:, gate.channels:].split(gate.channels, dim=1)
        params = (grad_w1.view_as(gate.fc1.weight), grad_bn_w, grad_bn_b, grad_w2.view_as(gate.fc2.weight), grad_b2)
        return None, None, grad_y, *grad_pooled, *params


def _fold_eval_head(gate: 'DenseGate') -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's layers for inference as two matrix products: the eval-mode BatchNorm folded into fc1
    (``h = g @ w1.T + b1``, w1 (M, width): one row per hidden unit, which the compiled head reads as dot
    products), fc2 transposed (``logits = h @ w2 + b2``, w2 (M, width)), and the padding mask as -inf in fc2's bias
    (softmax gives those logits weight 0, exactly as the mask does)."""
    bn = gate.bn
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w1 = (gate.fc1.weight.flatten(1) * scale[:, None]).contiguous()
    b1 = bn.bias - bn.running_mean * scale
    w2 = gate.fc2.weight.flatten(1).t().contiguous()
    b2 = gate.fc2.bias.clone()
    mask = gate.weights.padding_mask(b2.device)
    if mask is not None:
        b2[gate.channels:].view_as(mask).masked_fill_(mask, float('-inf'))
    return w1, b1, w2, b2


class _EvalHeadCache:
    """:func:`_fold_eval_head`'s result, made again whenever a tensor it was made from changes: replaced
    (another object or storage, as after ``.to()``) or written in place (its version counter, as after
    ``load_state_dict`` or an optimizer step). It holds those tensors, so their memory is not reused meanwhile.
    Tensors made in inference mode have no version counter to watch: for them there is no cache (None)."""

    def __init__(self):
        self.sources: Tuple[torch.Tensor, ...] = ()
        self.stamp: List[Tuple[int, int]] = []
        self.folded: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def get(self, gate: 'DenseGate') -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        # runs once per block and forward: plain dict lookups, not nn.Module.__getattr__
        modules = gate._modules
        fc1, bn, fc2 = modules['fc1']._parameters, modules['bn'], modules['fc2']._parameters
        sources = (fc1['weight'], bn._parameters['weight'], bn._parameters['bias'], bn._buffers['running_mean'],
                   bn._buffers['running_var'], fc2['weight'], fc2['bias'])
        if any(t.is_inference() for t in sources):
            return None
        stamp = [(t._version, t.data_ptr()) for t in sources]
        if (self.folded is None or stamp != self.stamp
                or any(a is not b for a, b in zip(sources, self.sources))):
            with torch.inference_mode(False), torch.no_grad():  # usable in inference mode and out of it
                self.folded = _fold_eval_head(gate)
            self.sources, self.stamp = sources, stamp
        return self.folded


def _eval_head_forward(
        gate: 'DenseGate', y: torch.Tensor, pooled: List[torch.Tensor],
        folded: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]):
    """(v, w) in inference (eval mode, no autograd): pool y, concat, two matrix products with the folded
    parameters (:class:`_EvalHeadCache`), sigmoid / softmax. Six operations instead of ten: after a block's
    convolutions each small operation costs tens of microseconds (cold caches), more than its arithmetic."""
    head = gate_head_eval(y, pooled, folded)
    if head is not None:  # the same, in compiled code, where it builds (fused.py)
        return head
    w1, b1, w2, b2 = folded
    g = torch.cat([global_avg_pool(y)] + pooled, dim=1)
    logits = torch.addmm(b2, torch.addmm(b1, g, w1.t()).relu_(), w2)
    return gate.weights.activate(logits, None)  # the padding mask is in b2 already


# ---------------------------------------------------------------------------------------------------------------
# the gate's layers


@register_notrace_module  # its shape test is python control flow; keep it a leaf for torch.fx
class GateConv(nn.Conv2d):
    """The gate's 1x1 convolution (the parameters of an ``nn.Conv2d``), which also takes the pooled vectors as
    (B, C): on such inputs it is a matrix product, several times cheaper than oneDNN's convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight.flatten(1), self.bias)
        return self._conv_forward(x, self.weight, self.bias)


@register_notrace_module  # its batch-size check is data dependent; keep it a leaf for torch.fx
class GateBatchNorm(nn.BatchNorm2d):
    """BatchNorm for the gate's pooled vectors, (B, M) or (B, M, 1, 1).

    With a single sample in training there is only one value per channel, which BatchNorm cannot normalise.
    Instead of failing, such a batch is normalised with the running statistics (as in eval mode), and the
    statistics are not updated.
    """

    def use_batch_stats(self, batch_size: int) -> bool:
        """Whether a batch is normalised with its own statistics (training, more than one sample: the gate's
        inputs are pooled, one value per channel and sample); if so, counts the batch as BatchNorm does."""
        use_batch_stats = self.training and batch_size > 1
        if use_batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return use_batch_stats

    def running_momentum(self) -> float:
        """The momentum of the running-statistics update (0 when ``momentum`` is None)."""
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.use_batch_stats(x.shape[0])
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats,
                            self.running_momentum(), self.eps)


class GateWeights(nn.Module):
    """Turns the gate's logits into ``v`` (sigmoid) and ``w`` (softmax over the inbounds, per channel).

    A channel that zero-padding created in an inbound (other than the shortcut) gets weight 0, so each channel's
    weights sum to one over the inbounds that really have it. It holds no parameters; it is a module of its own
    so that a forward hook can read ``(v, w)`` for inspection without slowing the normal forward.
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
        return self.activate(logits, self.padding_mask(logits.device))

    def activate(self, logits: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the padding mask given: None where the logits carry it already (-inf)."""
        v_logits, w_logits = logits.split([self.channels, self.num_inbounds * self.channels], dim=1)
        v = torch.sigmoid(v_logits)
        w_logits = w_logits.view(-1, self.num_inbounds, self.channels)
        if mask is not None:
            w_logits = w_logits.masked_fill(mask, float('-inf'))  # (n, C) broadcast
        w = torch.softmax(w_logits, dim=1)
        return v, w


class DenseGate(nn.Module):
    """Gate-Module: ``x = v * y + sum_k w_k * a_k`` with (v, w) computed from the pooled y and inbounds.

    Args:
        channels: C, the block's output channels.
        num_inbounds: n, the number of inbounds (the shortcut plus earlier outputs).
        reduction: r in ``M = ceil(max(C // r, 1) / 8) * 8``.
        valid_channels: for each inbound, how many leading channels are real (the rest is zero padding).
        act_layer: activation between the two 1x1 layers.
    """

    def __init__(
            self,
            channels: int,
            num_inbounds: int,
            reduction: int,
            valid_channels: List[int],
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert len(valid_channels) == num_inbounds
        self.channels = channels
        self.num_inbounds = num_inbounds
        hidden = gate_hidden_channels(channels, reduction)
        width = (num_inbounds + 1) * channels
        self.fc1 = GateConv(width, hidden, 1, bias=False, **dd)
        self.bn = GateBatchNorm(hidden, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = GateConv(hidden, width, 1, bias=True, **dd)
        self.weights = GateWeights(channels, valid_channels)
        self._eval_head = _EvalHeadCache()  # a cache, not state: no buffer in the state dict

    def compute_weights(self, y: torch.Tensor, inbounds: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``v`` of shape (B, C) and ``w`` of shape (B, n, C)."""
        return self.weights_for(y, [pad_channels(global_avg_pool(a), self.channels) for a in inbounds])

    def weights_for(self, y: torch.Tensor, inbounds_pooled: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compute_weights` from y and the :func:`global_avg_pool` (B, C) of each inbound.

        For callers that keep the pooled vector of each block output with the output: every output is then pooled
        once, not once by each of the N blocks that mix it. In eager mode the gate's small layers run as one
        autograd node (the compiled ``fused.gate_head_train`` where it builds, else :class:`_GateHeadFn`), and in
        inference (eval mode, no autograd) as two matrix products with the BatchNorm folded in
        (:func:`_eval_head_forward`), unless something expects the modules themselves: a hook on them, autocast,
        a tracer or the compiler.
        """
        if torch.jit.is_scripting():
            return self.weights_from_pooled([global_avg_pool(y)] + inbounds_pooled)
        else:
            if not self._fused_head_ok(y, inbounds_pooled):
                return self.weights_from_pooled([global_avg_pool(y)] + inbounds_pooled)
            if not torch.is_grad_enabled() and not self._modules['bn'].training:
                folded = self._eval_head.get(self)
                if folded is not None:
                    return _eval_head_forward(self, y, inbounds_pooled, folded)
            bn, fc1, fc2 = self.bn, self.fc1, self.fc2
            use_batch_stats = bn.use_batch_stats(y.shape[0])
            head = gate_head_train(
                y, inbounds_pooled, (fc1.weight, bn.weight, bn.bias, fc2.weight, fc2.bias),
                (bn.running_mean, bn.running_var, bn.running_momentum(), bn.eps), use_batch_stats,
                self.weights.valid_channels)
            if head is not None:  # the same, in compiled code, where it builds (fused.py)
                return head
            if not torch.is_grad_enabled():
                v, w, _ = _gate_head_forward(self, y, inbounds_pooled, use_batch_stats)
                return v, w
            return _GateHeadFn.apply(
                self, use_batch_stats, y, *inbounds_pooled,
                self.fc1.weight, self.bn.weight, self.bn.bias, self.fc2.weight, self.fc2.bias)

    @torch.jit.ignore
    def _fused_head_ok(self, y: torch.Tensor, inbounds_pooled: List[torch.Tensor]) -> bool:
        # runs once per block and forward: plain dict lookups, not nn.Module.__getattr__
        if isinstance(y, torch.fx.Proxy) or is_compiling() or not (y.is_cpu or y.is_cuda):
            return False
        if autocast_enabled('cpu' if y.is_cpu else 'cuda'):
            return False
        modules = self._modules
        if not all(hook_free(m) for m in modules.values()):
            return False
        fc1, bn = modules['fc1'], modules['bn']
        weight = fc1._parameters['weight']
        return (type(modules['act']) is nn.ReLU and fc1._parameters['bias'] is None
                and bn._buffers['running_mean'] is not None and bn._parameters['weight'] is not None
                and y.dtype == weight.dtype and all(p.dtype == weight.dtype for p in inbounds_pooled))

    def weights_from_pooled(self, pooled: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(v, w) through the gate's modules, from the :func:`global_avg_pool` (B, C) of y and of each inbound."""
        g = torch.cat(pooled, dim=1)
        return self.weights(self.fc2(self.act(self.bn(self.fc1(g)))))

    @staticmethod
    def mix(
            y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor], reuse_y: bool = False,
    ) -> torch.Tensor:
        """``v * y + sum_k w_k * a_k``, with v (B, C) and w (B, n, C) broadcast over H, W. An inbound narrower
        than y stands for itself zero-padded (:func:`adjust_inbound` with ``pad=False``).

        Under torch.compile it is the plain formula, which the compiler fuses into one pass; in eager mode it
        accumulates in place (:func:`weighted_sum`) with a leaner backward (:class:`_WeightedSumFn`).
        ``reuse_y``: the caller's ``y`` is a temporary that nothing reads afterwards; when autograd does not
        record (inference), the sum is accumulated into it instead of a new tensor.
        """
        if torch.jit.is_scripting():
            return weighted_sum(y, v, w, inbounds)
        else:
            if is_compiling():
                out = y * v[:, :, None, None]
                for k, a in enumerate(inbounds):
                    out = out + pad_channels(a, y.shape[1]) * w[:, k, :, None, None]
                return out
            if reuse_y and not torch.is_grad_enabled() and not isinstance(y, torch.fx.Proxy):
                return weighted_sum(y, v, w, inbounds, inplace=True)
            return weighted_sum_lean_backward(y, v, w, inbounds)

    def forward(self, y: torch.Tensor, inbounds: List[torch.Tensor]) -> torch.Tensor:
        v, w = self.compute_weights(y, inbounds)
        return self.mix(y, v, w, inbounds)

    @torch.no_grad()
    def set_identity(self, logit: float = 30.0) -> None:
        """Gate that passes ``y + shortcut``: v = sigmoid(logit) ~ 1, all mixing weight on the shortcut.

        With the default logit the deviation from a plain residual block is below float32 resolution; a
        smaller logit (e.g. 6) keeps the gate trainable when fine-tuning from ResNet weights.
        """
        nn.init.zeros_(self.fc2.weight)
        bias = self.fc2.bias.view(self.num_inbounds + 1, self.channels)
        bias.zero_()
        bias[0] = logit  # v
        bias[1] = logit  # w of the shortcut
