"""Read the gates: each block's mean ``v`` and mixing weights ``w_ik`` over a batch or a data set.

Forward hooks on the parameter-free ``gate.weights`` modules see ``(v, w)`` as they are computed; nothing is
recorded (and nothing slows down) unless :func:`record_gates` is active. This is what the paper's Fig. 4 plots.

Example::

    with record_gates(model) as stats:
        for images, _ in loader:
            model(images)
    stats.w_mean()   # {block name: [mean w for offset 1 (the shortcut), offset 2, ...]}
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn as nn

from .gate import GateWeights

__all__ = ['GateStats', 'record_gates', 'gate_modules']


def gate_modules(model: nn.Module) -> Dict[str, GateWeights]:
    """The gate-weight modules of a model in forward order, by their block's name (e.g. 'layer1.0')."""
    suffix = '.gate.weights'
    return {name[:-len(suffix)]: m for name, m in model.named_modules() if isinstance(m, GateWeights)}


class GateStats:
    """Running sums of ``v`` and ``w`` per block, averaged over every image (and channel) seen."""

    def __init__(self, block_names: List[str]):
        self.block_names = block_names
        self._v_sum: Dict[str, torch.Tensor] = {}
        self._w_sum: Dict[str, torch.Tensor] = {}
        self._count: Dict[str, int] = {}

    def add(self, block: str, v: torch.Tensor, w: torch.Tensor) -> None:
        """Accumulate one batch: v (B, C), w (B, n, C)."""
        v_sum = v.detach().float().mean(1).sum(0).cpu()
        w_sum = w.detach().float().mean(2).sum(0).cpu()
        if block in self._count:
            self._v_sum[block] += v_sum
            self._w_sum[block] += w_sum
            self._count[block] += v.shape[0]
        else:
            self._v_sum[block], self._w_sum[block], self._count[block] = v_sum, w_sum, v.shape[0]

    def v_mean(self) -> Dict[str, float]:
        """Mean ``v`` (the branch's scale) per block."""
        return {b: float(self._v_sum[b] / self._count[b]) for b in self.block_names if b in self._count}

    def w_mean(self) -> Dict[str, List[float]]:
        """Mean ``w_ik`` per block, listed by offset i-k = 1 (the shortcut), 2, ..., n."""
        return {b: (self._w_sum[b] / self._count[b]).tolist() for b in self.block_names if b in self._count}


@contextmanager
def record_gates(model: nn.Module) -> Iterator[GateStats]:
    """Collect gate statistics for every forward run inside the ``with`` block (eager mode only)."""
    modules = gate_modules(model)
    if not modules:
        raise ValueError(f'{type(model).__name__} has no DenseResNet gates to record')
    stats = GateStats(list(modules))
    handles = []
    for block, module in modules.items():
        def hook(_module, _inputs, output, block=block):
            v, w = output
            stats.add(block, v, w)
        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
