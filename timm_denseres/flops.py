"""Multiply-add counts with PyTorch's own counter (``torch.utils.flop_counter.FlopCounterMode``).

Counters disagree on element-wise work, so the count is split, all in multiply-adds (MACs):
- ``conv_linear``: convolutions and matrix products (the counter's built-in formulas, FLOPs / 2).
- ``norm``: batch norm, two per element (normalise, then the affine; as fvcore counts it).
- ``pool``: global/average pooling, one per input element (as fvcore counts it); the gates pool with a sum.
- ``merge``: joining branch and shortcut. A residual add is one per element; the gate's weighted sum is one
  multiply-add per element per inbound plus one for ``v`` (a ``mul`` and ``addcmul``/``add`` ops, one each).
``total`` is their sum. The ``conv_linear`` part alone is what the paper's ResNet-34 figure matches; the
totals match all three baselines of the paper within 1 % (see README).
"""
import math
from typing import Dict, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ._backends import kernels_disabled

__all__ = ['count_macs']

aten = torch.ops.aten
# The counter's unit is FLOPs (2 per multiply-add); our element-wise formulas use it too and are halved below.
_NORM_OPS = (aten._native_batch_norm_legit_no_training, aten.native_batch_norm, aten._native_batch_norm_legit)
_POOL_OPS = (aten.mean, aten.sum, aten.avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool2d)
_MERGE_OPS = (aten.add, aten.add_, aten.mul, aten.mul_, aten.addcmul, aten.addcmul_)


def _per_input_element(*args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(args[0])


def _two_per_input_element(*args, out_shape=None, **kwargs) -> int:
    return 4 * math.prod(args[0])


def _per_output_element(*args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape)


def count_macs(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> Dict[str, int]:
    """Multiply-adds of one forward pass of ``model`` in eval mode, per image.

    Args:
        model: the network (left in the train/eval state it had).
        input_size: (C, H, W).
        batch_size: images in the counted batch (the result is divided by it).

    Returns:
        dict with 'conv_linear', 'norm', 'pool', 'merge' and 'total' multiply-adds per image.
    """
    mapping = {op: _two_per_input_element for op in _NORM_OPS}
    mapping.update({op: _per_input_element for op in _POOL_OPS})
    mapping.update({op: _per_output_element for op in _MERGE_OPS})
    counter = FlopCounterMode(display=False, custom_mapping=mapping)

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, device=param.device, dtype=param.dtype)
    try:
        # with autograd on, the forward takes the training-time ops (e.g. the history's 2x2 pool as a depthwise
        # convolution, not the strided adds of inference), so the count does not depend on the grad mode
        with torch.enable_grad(), kernels_disabled(), counter:  # the formula's operations, not the kernels'
            model(x)
    finally:
        model.train(was_training)

    by_op = counter.get_flop_counts().get('Global', {})
    groups = {'norm': _NORM_OPS, 'pool': _POOL_OPS, 'merge': _MERGE_OPS}
    result = {name: sum(by_op.get(op, 0) for op in ops) // 2 // batch_size for name, ops in groups.items()}
    elementwise_ops = set(_NORM_OPS + _POOL_OPS + _MERGE_OPS)
    result['conv_linear'] = sum(v for op, v in by_op.items() if op not in elementwise_ops) // 2 // batch_size
    result['total'] = sum(result.values())
    return result
