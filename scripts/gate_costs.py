"""Where a dense model's extra time goes: the model timed with parts of its gates replaced by trivial stand-ins,
against its baseline, interleaved in one process. The stand-ins give wrong outputs: this is for timing only.

Variants, each on top of the one before:
- ``full``: the model as it is (with the compiled kernels of ``timm_denseres/fused.py`` where they build: the
  weighted sum with the activation and the output's mean, and the gate head).
- ``constant-weights``: the gate head (pooling y, the small layers, sigmoid / softmax) returns fixed (v, w).
- ``pytorch-ops``: the kernels off (``timm_denseres.fused.kernel_disabled``): the weighted sum, the activation
  and the output's mean as PyTorch operations.
- ``no-pooling``: the pooled means of the history are a view of one pixel instead of a global average.
- ``plain-add``: the weighted sum is ``y + shortcut``; what is left over the baseline is the history's
  bookkeeping (lists, the pool at stage changes) and the cache the kept outputs take.

So ``full - constant-weights`` is the gate head's cost and ``pytorch-ops - constant-weights`` what the weighted-sum
kernel saves. A last row, ``full, sum as plain add``, is derived: ``full - (constant-weights - plain-add)``, the
model with its weighted sum (with the output's mean, forward and backward) costing no more than the baseline's
residual add. No kernel for the sum of N + 1 maps can do better than one that adds two, so it bounds what a
faster weighted-sum kernel could reach.

    python scripts/gate_costs.py --model denseresnet110_n4 --baseline resnet110 --img-size 32 --modes infer train
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, List

import timm
import torch

import timm_denseres  # noqa: F401  registers the models
import timm_denseres.resnet as dense_resnet
from timm_denseres.fused import kernel_disabled
from timm_denseres.gate import DenseGate, pad_channels

from benchmark import STEADY_MALLOC_ENV, require_models, timed  # scripts/ is on sys.path when a script in it runs

VARIANTS = ['full', 'constant-weights', 'pytorch-ops', 'no-pooling', 'plain-add']
FUSED_SUM_BOUND = 'full, sum as plain add'


def _constant_weights(gate: DenseGate, y: torch.Tensor, pooled: List[torch.Tensor]):
    batch = y.shape[0]
    return (y.new_full((batch, gate.channels), 0.5),
            y.new_full((batch, gate.num_inbounds, gate.channels), 1.0 / gate.num_inbounds))


def _plain_add(y, v, w, inbounds, reuse_y=False):
    return y + pad_channels(inbounds[0], y.shape[1])  # a copy only where the shortcut is narrow


@contextmanager
def stand_ins(variant: str) -> Iterator[None]:
    """Replace the gate's parts up to ``variant`` (see the module docstring); restore them on exit."""
    level = VARIANTS.index(variant)
    saved = DenseGate.weights_for, DenseGate.__dict__['mix'], dense_resnet.global_avg_pool
    try:
        if level >= 1:
            DenseGate.weights_for = _constant_weights
        with kernel_disabled() if level >= 2 else nullcontext():
            if level >= 3:
                dense_resnet.global_avg_pool = lambda x: x[:, :, 0, 0]
            if level >= 4:
                DenseGate.mix = staticmethod(_plain_add)
            yield
    finally:
        DenseGate.weights_for, DenseGate.mix, dense_resnet.global_avg_pool = saved


def _step(model: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    if mode == 'infer':
        with torch.inference_mode():
            model(x)
    else:
        model.zero_grad(set_to_none=True)
        model(x).float().logsumexp(1).mean().backward()


def _ms_per_step(model: torch.nn.Module, x: torch.Tensor, mode: str, min_time: float, warmup: int) -> float:
    for _ in range(warmup):  # after a change of variant the allocator settles over a few steps
        _step(model, x, mode)
    return 1e3 / timed(lambda: _step(model, x, mode), x.device, min_time, time.perf_counter)


def measure(args) -> Dict[str, Dict[str, float]]:
    """Median ms per step of each variant and of the baseline, per mode."""
    torch.manual_seed(0)
    dense, base = timm.create_model(args.model), timm.create_model(args.baseline)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    result = {}
    for mode in args.modes:
        for model in (dense, base):
            model.train(mode == 'train')
        times: Dict[str, List[float]] = {name: [] for name in VARIANTS + ['baseline']}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                with stand_ins(variant):
                    times[variant].append(_ms_per_step(dense, x, mode, args.min_time, args.warmup))
            times['baseline'].append(_ms_per_step(base, x, mode, args.min_time, args.warmup))
        result[mode] = {name: statistics.median(t) for name, t in times.items()}
    return result


def format_table(result: Dict[str, Dict[str, float]], args) -> str:
    lines = [f'{args.model} vs {args.baseline}, {args.img_size}px, batch {args.batch_size}, '
             f'{torch.get_num_threads()} threads, median of {args.repeats}',
             '', '| variant | ' + ' | '.join(f'{m} ms/step | {m} baseline / variant' for m in result) + ' |',
             '|---|' + '---|---|' * len(result)]
    rows = {name: [r[name] for r in result.values()] for name in VARIANTS + ['baseline']}
    rows[FUSED_SUM_BOUND] = [r['full'] - (r['constant-weights'] - r['plain-add']) for r in result.values()]
    for name, times in rows.items():
        cells = [f'{ms:.1f} | {r["baseline"] / ms:.3f}' for ms, r in zip(times, result.values())]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='denseresnet110_n4')
    parser.add_argument('--baseline', default='resnet110')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--min-time', type=float, default=1.0, help='seconds per timing')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps before each timing')
    parser.add_argument('--malloc', choices=['default', 'steady'], default='steady',
                        help="'steady': glibc keeps freed memory, as in benchmark.py (run as a script, it restarts "
                             "itself with the setting)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_models([args.model, args.baseline])
    torch.set_num_threads(args.threads)
    print(format_table(measure(args), args))


if __name__ == '__main__':
    if parse_args().malloc == 'steady' and any(os.environ.get(k) != v for k, v in STEADY_MALLOC_ENV.items()):
        # glibc reads these at start-up only: run again with them set
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **STEADY_MALLOC_ENV})
    main()
