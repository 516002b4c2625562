"""What every dense family shares: the history of block outputs, the dense block's forward, stages, gate set-up.

Block i maps the history ``[x_{i-n}, ..., x_{i-1}]`` (x_0 the stem output) to ``[..., x_i]`` and keeps each output's
mean over H, W beside it, since N gates read it. Where a block changes the shape (stride or width), the whole
history is brought to the new shape once: ceil-mode 2x2 average pool, channels cut where wider; a narrower
output stays narrow and stands for itself zero-padded (the gate adds it into the channels it has).

A family supplies, per block: ``branch(x)``, ``shortcut(x, history)`` (the first inbound and its mean), the static
facts ``in_chs``, ``out_chs``, ``pool``, ``changes_shape``, and a ``drop_path`` (a module or None); and per model
``dense_stages()``. :func:`attach_gates` adds the gates and ``num_inbounds`` / ``history_len``.
"""
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, ContextManager, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from torch.utils.checkpoint import checkpoint

from ._runtime import capturing_graph
from .gate import DenseGate

__all__ = ['History', 'DenseBlockMixin', 'DenseStage', 'DenseModelMixin', 'attach_gates', 'avg_pool_2x2',
           'adjust_inbound', 'pad_channels', 'run_stages']


class History(NamedTuple):
    """The last block outputs, oldest first, and their means over H, W (B, C), zero-padded to the width of the
    block that last adjusted them."""
    outputs: List[torch.Tensor]
    means: List[torch.Tensor]


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2, ceil_mode=True)``; in eager mode on CPU, for even H and W, as a depthwise
    convolution with weights 1/4 when autograd records (the same numbers; PyTorch's CPU pool is slower in both
    directions), else as two strided adds (to 1 ulp). A leaf for torch.fx (its test is on shapes)."""
    if torch.jit.is_scripting():
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    else:
        if (capturing_graph() or x.device.type != 'cpu' or not x.is_floating_point()
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


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``x`` (a (B, c) vector or a (B, c, H, W) map) to ``channels``; ``x`` itself if it is
    that wide already."""
    missing = channels - x.shape[1]
    if missing <= 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, missing])


torch.fx.wrap('pad_channels')  # its width test reads the shape; a leaf for torch.fx


def adjust_inbound(x: torch.Tensor, in_chs: int, channels: int, pool: bool) -> torch.Tensor:
    """An earlier output (``in_chs`` wide) in a block's shape: pooled if the block strides, cut to ``channels`` if
    wider; a narrower one stays narrow (its padding is implied). Parameter free, so the identity path survives."""
    if pool:
        x = avg_pool_2x2(x)
    if in_chs > channels:
        x = x[:, :channels]
    return x


def adjust_history(history: History, in_chs: int, out_chs: int, pool: bool) -> History:
    """The history in a block's new shape (:func:`adjust_inbound`), with the means of the adjusted outputs."""
    outputs = [adjust_inbound(x, in_chs, out_chs, pool) for x in history.outputs]
    return History(outputs, [pad_channels(x.mean((2, 3)), out_chs) for x in outputs])


def join_history(history: History, out: torch.Tensor, out_mean: torch.Tensor, history_len: int) -> History:
    """The next block's history: the last ``history_len`` outputs with ``out`` the latest. New lists: the caller's
    history must stay intact (activation checkpointing runs a block again)."""
    return History((history.outputs + [out])[-history_len:], (history.means + [out_mean])[-history_len:])


class DenseBlockMixin:
    """The dense forward of a block, mixed into a family's block class (see the module docstring)."""

    def dense_forward(self, history: History) -> History:
        x = history.outputs[-1]
        y = self.branch(x)
        if self.changes_shape:
            history = adjust_history(history, self.in_chs, self.out_chs, self.pool)
        shortcut, shortcut_mean = self.shortcut(x, history)
        # inbounds, most recent first: the shortcut (in place of x_{i-1}), then x_{i-2}, x_{i-3}, ...
        inbounds, means = [shortcut], [shortcut_mean]
        for k in range(2, self.num_inbounds + 1):
            inbounds.append(history.outputs[-k])
            means.append(history.means[-k])
        # the gate looks at y; drop-path (a per-sample scale) applies to the y that is mixed
        y_mixed = y if self.drop_path is None else self.drop_path(y)
        gate = self.gate
        assert gate is not None
        out, out_mean = gate(y, inbounds, means, y_mixed)
        return join_history(history, out, out_mean, self.history_len)


def attach_gates(
        blocks: Sequence[nn.Module], stem_chs: int, dense_n: int,
        make_gate: Callable[[nn.Module, List[int]], DenseGate],
) -> None:
    """Give every block its gate. Follows the history's widths statically, so each gate knows how many inbounds it
    mixes and which of their channels are real (the rest is zero padding, left out of the softmax).
    ``make_gate(block, valid_channels)`` builds one gate."""
    history_valid = [stem_chs]
    for block in blocks:
        if block.changes_shape:
            history_valid = [min(c, block.out_chs) for c in history_valid]
        block.num_inbounds = min(dense_n, len(history_valid))
        block.history_len = dense_n
        valid = [block.out_chs] + [history_valid[-k] for k in range(2, block.num_inbounds + 1)]
        block.gate = make_gate(block, valid)
        history_valid = (history_valid + [block.out_chs])[-dense_n:]


@contextmanager
def _keep_norm_stats(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of ``module`` on exit: checkpointing runs a block's forward again
    in backward, which would otherwise update them (and ``num_batches_tracked``) twice per step."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _checkpoint_contexts(block: nn.Module) -> Tuple[ContextManager, ContextManager]:
    return nullcontext(), _keep_norm_stats(block)  # (forward, recompute)


class DenseStage(nn.Sequential):
    """A stage of dense blocks: passes the history from block to block (the blocks keep the family's names)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, history: History) -> History:
        for block in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                history = checkpoint(
                    block, history, use_reentrant=False, context_fn=partial(_checkpoint_contexts, block))
            else:
                history = block(history)
        return history


def run_stages(
        history: History, stages: Sequence[nn.Module], take_indices: Sequence[int], intermediates: List[torch.Tensor],
) -> History:
    """Run ``stages`` (feature indices 1, 2, ...), appending the output of each stage in ``take_indices``."""
    for feat_idx, stage in enumerate(stages, start=1):
        history = stage(history)
        if feat_idx in take_indices:
            intermediates.append(history.outputs[-1])
    return history


def _is_gate_parameter(name: str) -> bool:
    return '.gate.' in f'.{name}'


class DenseModelMixin:
    """Model methods shared by the dense families; the model supplies ``dense_stages()``, ``num_features``,
    ``global_pool`` and its classifier under the name ``get_classifier(name_only=True)`` returns."""

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier on the model's device and dtype, in its train/eval mode; ``global_pool=None`` keeps the
        current pooling."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        ref = next(self.parameters())
        self.global_pool, classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=ref.device, dtype=ref.dtype)
        setattr(self, self.get_classifier(name_only=True), classifier)
        self.global_pool.train(self.training)
        classifier.train(self.training)

    def dense_blocks(self) -> List[nn.Module]:
        return [block for stage in self.dense_stages() for block in stage if getattr(block, 'gate', None) is not None]

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay: every gate's, with
        ``gate_weight_decay=False``."""
        if getattr(self, 'gate_weight_decay', True):
            return set()
        return {name for name, _ in self.named_parameters() if _is_gate_parameter(name)}

    @torch.jit.ignore
    def set_gates_identity(self, logit: float = 30.0) -> None:
        """Every gate at ``v ~ 1`` with all mixing weight on the shortcut: each block computes
        ``act(branch(x) + shortcut(x))``, the plain residual block (to float32 resolution at the default logit)."""
        for block in self.dense_blocks():
            block.gate.set_identity(logit)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.dense_stages():
            stage.grad_checkpointing = enable
