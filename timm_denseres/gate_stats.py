"""Read the gates: each block's mean ``v`` and mixing weights ``w_ik`` over a batch or a data set.

Every gate reports the ``(v, w)`` it computes to its ``observer`` (eager mode, on the kernels' path as on the
modules'); nothing is recorded unless :func:`record_gates` or a :class:`GateTelemetry` is attached. This is what
the paper's Fig. 4 plots.

Example::

    with record_gates(model) as stats:
        for images, _ in loader:
            model(images)
    stats.w_mean()   # {block name: [mean w for offset 1 (the shortcut), offset 2, ...]}
"""
import csv
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from .gate import DenseGate, GateWeights

__all__ = ['GateStats', 'GateTelemetry', 'record_gates', 'gate_modules', 'dense_gates', 'start_mix', 'mix_shift',
           'TELEMETRY_FILE']

TELEMETRY_FILE = 'gates.csv'


def gate_modules(model: nn.Module) -> Dict[str, GateWeights]:
    """The gate-weight modules of a model in forward order, by their block's name (e.g. 'layer1.0')."""
    suffix = '.gate.weights'
    return {name[:-len(suffix)]: m for name, m in model.named_modules() if isinstance(m, GateWeights)}


def dense_gates(model: nn.Module) -> Dict[str, DenseGate]:
    """The gates of a model in forward order, by their block's name."""
    suffix = '.gate'
    return {name[:-len(suffix)]: m for name, m in model.named_modules() if isinstance(m, DenseGate)}


class GateStats:
    """Running sums of ``v``, ``w`` and the entropy of ``w`` per block, averaged over every image (and channel)
    seen."""

    def __init__(self, block_names: List[str]):
        self.block_names = block_names
        self._v_sum: Dict[str, torch.Tensor] = {}
        self._w_sum: Dict[str, torch.Tensor] = {}
        self._entropy_sum: Dict[str, torch.Tensor] = {}
        self._count: Dict[str, int] = {}

    def add(self, block: str, v: torch.Tensor, w: torch.Tensor) -> None:
        """Accumulate one batch: v (B, C), w (B, n, C)."""
        v, w = v.detach().float(), w.detach().float()
        sums = (v.mean(1).sum(0), w.mean(2).sum(0), -torch.special.xlogy(w, w).sum(1).mean(1).sum(0))
        v_sum, w_sum, entropy_sum = (t.cpu() for t in sums)
        if block in self._count:
            self._v_sum[block] += v_sum
            self._w_sum[block] += w_sum
            self._entropy_sum[block] += entropy_sum
            self._count[block] += v.shape[0]
        else:
            self._v_sum[block], self._w_sum[block], self._entropy_sum[block] = v_sum, w_sum, entropy_sum
            self._count[block] = v.shape[0]

    def __bool__(self) -> bool:
        return bool(self._count)

    def v_mean(self) -> Dict[str, float]:
        """Mean ``v`` (the branch's scale) per block."""
        return {b: float(self._v_sum[b] / self._count[b]) for b in self.block_names if b in self._count}

    def w_mean(self) -> Dict[str, List[float]]:
        """Mean ``w_ik`` per block, listed by offset i-k = 1 (the shortcut), 2, ..., n."""
        return {b: (self._w_sum[b] / self._count[b]).tolist() for b in self.block_names if b in self._count}

    def entropy_mean(self) -> Dict[str, float]:
        """Mean entropy (nats) of each channel's mixing weights per block: 0 with all weight on one inbound,
        ``log n`` when uniform."""
        return {b: float(self._entropy_sum[b] / self._count[b]) for b in self.block_names if b in self._count}


@contextmanager
def record_gates(model: nn.Module) -> Iterator[GateStats]:
    """Collect gate statistics for every forward run inside the ``with`` block (eager mode only)."""
    gates = dense_gates(model)
    if not gates:
        raise ValueError(f'{type(model).__name__} has no DenseResNet gates to record')
    stats = GateStats(list(gates))
    names = {id(gate): block for block, gate in gates.items()}
    for gate in gates.values():
        gate.observer = lambda g, v, w: stats.add(names[id(g)], v, w)
    try:
        yield stats
    finally:
        for gate in gates.values():
            gate.observer = None


@torch.no_grad()
def start_mix(gate: DenseGate) -> List[float]:
    """The mean mixing weights (per inbound, over channels) that fc2's bias alone gives: a gate's mix before
    training, exactly so where fc2's weight is zero (the models' default start)."""
    bias = gate.fc2.bias.detach().float().cpu().view(gate.num_inbounds + 1, gate.channels)[1:] * gate.logit_scale
    mask = gate.weights.padding_mask(torch.device('cpu'))
    if mask is not None:
        bias = bias.masked_fill(mask, float('-inf'))
    return torch.softmax(bias, dim=0).mean(1).tolist()


def mix_shift(w: Dict[str, List[float]], reference: Dict[str, List[float]]) -> float:
    """Mean absolute difference of two sets of per-block mean mixing weights, over blocks and inbounds."""
    diffs = [abs(a - b) for block in reference for a, b in zip(w[block], reference[block])]
    return sum(diffs) / len(diffs)


def _stage(block: str) -> str:
    return block.rsplit('.', 1)[0]


class GateTelemetry:
    """How far a training run's gates have moved, epoch by epoch: while attached, it accumulates the ``(v, w)`` of
    every forward in eval mode (timm's train.py evaluates once per epoch), and :meth:`write` appends one row per
    block, per stage and for the whole model to ``gates.csv``:

    - ``v``: the mean branch scale; ``w_shortcut``: the mean weight of the shortcut (offset 1);
    - ``w_moved``: mean |w - w_start| over the inbounds, w_start being the gates' mix when the telemetry was
      attached (:func:`start_mix`: the run's start);
    - ``w_entropy``: the mean entropy of each channel's mix (nats); ``w``: the block's mean w by offset.

    Only the gates of the model it was attached to are read (not a copy, e.g. timm's EMA model).
    """

    FIELDS = ('epoch', 'scope', 'v', 'w_shortcut', 'w_moved', 'w_entropy', 'w')

    def __init__(self, model: nn.Module):
        self.gates = dense_gates(model)
        if not self.gates:
            raise ValueError(f'{type(model).__name__} has no DenseResNet gates to follow')
        self.start = {block: start_mix(gate) for block, gate in self.gates.items()}
        self._names = {id(gate): block for block, gate in self.gates.items()}
        self.stats = GateStats(list(self.gates))
        for gate in self.gates.values():
            gate.observer = self._observe

    def _observe(self, gate: DenseGate, v: torch.Tensor, w: torch.Tensor) -> None:
        block = self._names.get(id(gate))
        if block is not None and not gate.training:
            self.stats.add(block, v, w)

    def detach(self) -> None:
        for gate in self.gates.values():
            gate.observer = None

    def rows(self, epoch: int) -> List[Dict[str, object]]:
        """The rows for what was seen since the last call (none if nothing was evaluated), then starts afresh."""
        stats, self.stats = self.stats, GateStats(list(self.gates))
        if not stats:
            return []
        v, w, entropy = stats.v_mean(), stats.w_mean(), stats.entropy_mean()
        moved = {b: sum(abs(a - s) for a, s in zip(w[b], self.start[b])) / len(w[b]) for b in w}
        scopes: Dict[str, List[str]] = {'all': list(w)}
        for block in w:
            scopes.setdefault(_stage(block), []).append(block)
        rows = []
        for scope, blocks in list(scopes.items()) + [(b, [b]) for b in w]:
            def mean(values: Dict[str, float]) -> str:
                return f'{sum(values[b] for b in blocks) / len(blocks):.5f}'
            rows.append(dict(epoch=epoch, scope=scope, v=mean(v), w_shortcut=mean({b: w[b][0] for b in blocks}),
                             w_moved=mean(moved), w_entropy=mean(entropy),
                             w=' '.join(f'{x:.5f}' for x in w[blocks[0]]) if len(blocks) == 1 else ''))
        return rows

    def write(self, epoch: int, folder: Path) -> Optional[Path]:
        """Append this epoch's rows to ``folder/gates.csv`` (with a header if it is new); its path, or None if
        nothing was evaluated since the last write."""
        rows = self.rows(epoch)
        if not rows:
            return None
        path = Path(folder) / TELEMETRY_FILE
        new = not path.is_file()
        with open(path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        return path

