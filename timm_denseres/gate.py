"""The DenseResNet Gate-Module and the helpers that bring earlier block outputs to a block's shape.

A dense block computes ``x_i = v * y + sum_k w_k * a_k`` where ``y`` is the block's branch output, ``a_1`` its
shortcut and ``a_2..a_n`` earlier block outputs adjusted to ``y``'s shape. The gate is SE-like: it only looks at
global-average-pooled vectors, so it adds few parameters and FLOPs (see ../shared/denseresnet.md).
"""
import math
from typing import List, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['DenseGate', 'GateBatchNorm', 'GateWeights', 'gate_hidden_channels', 'adjust_inbound']


def gate_hidden_channels(channels: int, reduction: int) -> int:
    """Width M of the gate's hidden layer: ``ceil(max(C // r, 1) / 8) * 8`` (the rule that matches the paper)."""
    return int(math.ceil(max(channels // reduction, 1) / 8) * 8)


def adjust_inbound(x: torch.Tensor, in_chs: int, channels: int, pool: bool) -> torch.Tensor:
    """Bring an earlier block output (``in_chs`` wide) to the next stage's shape: ceil-mode 2x2 average pool,
    then zero-pad (or cut) the channels to ``channels``. Parameter free, so the identity path survives.
    The widths are static ints so that torch.fx can trace it."""
    if pool:
        x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    if in_chs < channels:
        x = F.pad(x, (0, 0, 0, 0, 0, channels - in_chs))
    elif in_chs > channels:
        x = x[:, :channels]
    return x


@register_notrace_module  # its batch-size check is data dependent; keep it a leaf for torch.fx
class GateBatchNorm(nn.BatchNorm2d):
    """BatchNorm for the gate's pooled (B, M, 1, 1) vectors.

    With a single sample in training there is only one value per channel, which BatchNorm cannot normalise.
    Instead of failing, such a batch is normalised with the running statistics (as in eval mode), and the
    statistics are not updated.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training and x.shape[0] * x.shape[2] * x.shape[3] > 1
        if use_batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps)


class GateWeights(nn.Module):
    """Turns the gate's logits into ``v`` (sigmoid) and ``w`` (softmax over the inbounds, per channel).

    A channel that zero-padding created in an inbound (other than the shortcut) gets weight 0, so each channel's
    weights sum to one over the inbounds that really have it. It holds no parameters; it is a module of its own
    so that a forward hook can read ``(v, w)`` for inspection without slowing the normal forward.
    """

    def __init__(self, channels: int, valid_channels: List[int]):
        super().__init__()
        self.channels = channels
        self.valid_channels = valid_channels  # per inbound, how many leading channels are real
        self.needs_mask = any(c < channels for c in valid_channels)

    def forward(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # logits: (B, n + 1, C)
        v = torch.sigmoid(logits[:, 0])
        w_logits = logits[:, 1:]
        if self.needs_mask:
            chan = torch.arange(self.channels, device=logits.device)
            valid = torch.tensor(self.valid_channels, device=logits.device)
            keep = chan.unsqueeze(0) < valid.unsqueeze(1)  # (n, C)
            w_logits = w_logits.masked_fill(~keep.unsqueeze(0), float('-inf'))
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
        self.fc1 = nn.Conv2d(width, hidden, 1, bias=False, **dd)
        self.bn = GateBatchNorm(hidden, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(hidden, width, 1, bias=True, **dd)
        self.weights = GateWeights(channels, valid_channels)

    def compute_weights(self, y: torch.Tensor, inbounds: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``v`` of shape (B, C) and ``w`` of shape (B, n, C)."""
        pooled = [y.mean((2, 3), keepdim=True)]
        for a in inbounds:
            pooled.append(a.mean((2, 3), keepdim=True))
        g = torch.cat(pooled, dim=1)
        logits = self.fc2(self.act(self.bn(self.fc1(g))))
        logits = logits.reshape(logits.shape[0], self.num_inbounds + 1, self.channels)
        return self.weights(logits)

    @staticmethod
    def mix(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor]) -> torch.Tensor:
        """``v * y + sum_k w_k * a_k``, with v (B, C) and w (B, n, C) broadcast over H, W."""
        # one multiply-add per element per inbound (addcmul), plus one multiply for v
        out = y * v[:, :, None, None]
        for k, a in enumerate(inbounds):
            out = torch.addcmul(out, a, w[:, k, :, None, None])
        return out

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
