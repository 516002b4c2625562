"""Speed and memory of a DenseResNet against its baseline, measured in the same run.

For each pair (model, baseline) and device it measures, interleaved (model, baseline, baseline, model, ...):
inference and training-step throughput (images/s, the median over the repeats), the peak memory of one training
step and one inference batch, parameters and multiply-adds (``timm_denseres.flops.count_macs``). It prints one
Markdown table per run with a ``ratio`` row (model / baseline) under each pair. The ratios are the median of the
per-repeat ratios, so load that changes during the run cancels out as far as possible. Each model runs in a
worker process of its own (one at a time), as it would alone: sharing one process's heap made the ratios depend
on which model had allocated what before.

    # the table of docs/speed.md (CPU, 2 threads, batch 32)
    PYTHONPATH=. python tools/benchmark.py --threads 2 --batch-size 32 --malloc steady
    # one pair, faster settings
    PYTHONPATH=. python tools/benchmark.py --pairs resnet110 --repeats 3 --min-time 0.5
    # any two timm models
    PYTHONPATH=. python tools/benchmark.py --model denseresnet34_n2 --baseline resnet34 --img-size 160

Operations per training step (``--count-ops``, any device, CPU by default): the operations of one SGD step
(forward, backward, optimizer with ``foreach``), counted as kernel launches are: every ATen operation except views
and allocations (which launch nothing), and a Triton launch of the gate as one. On CPU with
``TIMM_DENSERES_FUSED=0 TRITON_INTERPRET=1`` that is the path CUDA takes (the interpreter's own operations left
out); with ``TIMM_DENSERES_TRITON=0`` too, the plain formula's.

    TIMM_DENSERES_FUSED=0 TRITON_INTERPRET=1 PYTHONPATH=. python tools/benchmark.py --count-ops

Peak memory counts what a step allocates on top of what already lives (parameters, buffers, optimizer state,
the input batch), plus those persistent bytes. On CUDA it is ``torch.cuda.max_memory_allocated``; on CPU it is
followed through the allocation events of ``torch.profiler`` (profile_memory=True), which see PyTorch's own
allocator only (not, e.g., oneDNN scratch space allocated outside it).
"""
import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.flops import count_macs

# baseline name -> (dense model, image size)
PAIRS: Dict[str, Tuple[str, int]] = {
    'resnet110': ('denseresnet110_n4', 32),
    'resnet34': ('denseresnet34_n6', 224),
    'mobilenetv2_100': ('densemobilenetv2_n4', 224),
}
# glibc malloc settings for --malloc steady: every allocation from the heap, which is never given back to the
# system. By default glibc trims the heap and maps large blocks afresh, so a tensor's memory often comes with page
# faults, depending on what the process allocated before (the ratios moved by 10-30 % from run to run).
STEADY_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(2 ** 30), 'MALLOC_TRIM_THRESHOLD_': str(2 ** 40)}
AMP_DTYPES = {'none': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
# the CPU peak-memory profile makes the workers log to stderr: Kineto's profiler_start/profiler_stop lines (and, on
# a CUDA build without a GPU, "gpuGetDeviceCount failed"), and c10's warning that a block allocated before the
# profile was freed inside it (its size is unknown, so it is left out: the step's own allocations are what count)
QUIET_PROFILER_ENV = {'KINETO_LOG_LEVEL': '6', 'TORCH_CPP_LOG_LEVEL': 'ERROR'}  # set unless already set


@dataclass
class Subject:
    """One model under test and what was measured for it."""
    name: str
    model: Optional[nn.Module] = None  # only in the worker process that runs it
    step: Dict[str, Callable[[], None]] = field(default_factory=dict)
    rates: Dict[str, List[float]] = field(default_factory=dict)  # images/s per repeat
    peak: Dict[str, float] = field(default_factory=dict)  # bytes
    params: int = 0
    macs: Optional[int] = None
    persistent_bytes: Callable[[], int] = lambda: 0  # parameters, buffers, optimizer state, input


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _make_steps(subject: Subject, args, device: torch.device, size: int) -> None:
    """Inference and training closures that each process one batch (the same batch every time)."""
    model = subject.model
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    num_classes = model.num_classes
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, num_classes, (args.batch_size,), device=device)
    amp_dtype = AMP_DTYPES[args.amp_dtype]
    # autocast's cast cache would hold tensors of the capture, which a CUDA graph may not keep (PyTorch's note)
    autocast = ((lambda: torch.autocast(device.type, dtype=amp_dtype, cache_enabled=not args.cuda_graph))
                if amp_dtype else contextlib.nullcontext)
    runner = torch.compile(model, mode=args.compile) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            runner(x)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(runner(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def train_in_place() -> None:  # the captured step: backward writes the gradients of the capture in place
        model.train()
        with autocast():
            F.cross_entropy(runner(x), target).backward()
        optimizer.step()

    if args.cuda_graph:
        infer = _captured(infer, infer, device)
        train = _captured(train, train_in_place, device, before=lambda: optimizer.zero_grad(set_to_none=True))
    subject.step = {'infer': infer, 'train': train}
    subject.persistent_bytes = lambda: (
        sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        + sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
              if torch.is_tensor(v))
        + x.numel() * x.element_size() + target.numel() * target.element_size())


def _captured(step: Callable[[], None], body: Callable[[], None], device: torch.device,
              before: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """``body`` captured in a CUDA graph after a few ``step`` calls on a side stream, ``before`` just before the
    capture (PyTorch's whole-network capture: the gradients set to None, so that the captured backward makes
    them in the graph's memory and each replay writes them afresh); returns the graph's replay, which launches
    every kernel of the step at once."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def require_models(names: List[str]) -> None:
    """Exit with a one-line message if timm does not know one of ``names``."""
    available = set(timm.list_models())
    missing = [n for n in names if n not in available]
    if missing:
        raise SystemExit(f'unknown model(s): {", ".join(missing)}')


def timed(step: Callable[[], None], device: torch.device, min_time: float, clock: Callable[[], float]) -> float:
    """Calls/s of ``step``, run until ``clock`` has advanced ``min_time`` seconds (at least once)."""
    _sync(device)
    start = clock()
    calls = 0
    while True:
        step()
        calls += 1
        _sync(device)
        elapsed = clock() - start
        if elapsed >= min_time:
            return calls / elapsed


def _peak_bytes(subject: Subject, mode: str, device: torch.device) -> float:
    """Peak bytes during one call of a step, the persistent state (parameters, optimizer state, input) included."""
    step = subject.step[mode]
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return float(peak + subject.persistent_bytes())


def _ratio_of_medians_per_repeat(a: List[float], b: List[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _serve(conn, name: str, size: int, device_name: str, args) -> None:
    """A worker process: builds one model, then answers the parent's requests until it says stop."""
    torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = timm.create_model(name)
    subject = Subject(name, model, params=sum(p.numel() for p in model.parameters()))
    macs = None if args.no_macs else count_macs(model, (3, size, size))['total']
    _make_steps(subject, args, device, size)
    # CPU time of the process (all its threads) instead of wall time: on a shared machine it leaves out the time
    # the other processes take, though not what they do to caches and memory bandwidth
    clock = time.process_time if args.timer == 'cpu' and device.type == 'cpu' else time.perf_counter
    conn.send((subject.params, macs))
    while True:
        request, mode = conn.recv()
        if request == 'stop':
            return
        if request == 'warmup':  # allocator, oneDNN primitives, torch.compile
            for _ in range(args.warmup):
                subject.step[mode]()
            conn.send(None)
        elif request == 'rate':
            conn.send(timed(subject.step[mode], device, args.min_time, clock) * args.batch_size)
        elif request == 'peak':
            conn.send(_peak_bytes(subject, mode, device))


class _Worker:
    """One model in a process of its own. Both models of a pair then run as they would alone: PyTorch frees CPU
    tensors to the C allocator, and in one shared process the other model's allocations change when the heap
    grows and shrinks (page faults), which moved a ratio by more than 10 % from run to run."""

    def __init__(self, name: str, size: int, device_name: str, args):
        context = multiprocessing.get_context('spawn')
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, name, size, device_name, args), daemon=True)
        saved_env = dict(os.environ)
        os.environ.update({k: v for k, v in QUIET_PROFILER_ENV.items() if k not in saved_env})  # read at start
        if args.malloc == 'steady':  # read by glibc when the worker starts
            os.environ.update(STEADY_MALLOC_ENV)
        try:
            self.process.start()
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
        self.name = name

    def ask(self, request: str, mode: Optional[str] = None):
        self.conn.send((request, mode))
        if request == 'stop':
            self.process.join()
            return None
        return self.conn.recv()

    def receive(self):
        return self.conn.recv()


def benchmark_pair(names: Tuple[str, str], size: int, device: torch.device, args) -> List[Subject]:
    """Measure ``names`` = (model, baseline) on ``device``; returns both subjects with their results.

    Each model lives in its own worker process; only one of them runs at a time, in the order model, baseline,
    baseline, model, ... so that load that drifts during the run hits both alike."""
    workers = [_Worker(name, size, device.type if device.index is None else str(device), args) for name in names]
    subjects = []
    try:
        for worker in workers:
            params, macs = worker.receive()
            subjects.append(Subject(worker.name, params=params, macs=macs))
        for mode in args.modes:
            for worker in workers:
                worker.ask('warmup', mode)
            for subject in subjects:
                subject.rates[mode] = []
            for repeat in range(args.repeats):
                order = list(zip(workers, subjects))
                for worker, subject in (order if repeat % 2 == 0 else order[::-1]):
                    subject.rates[mode].append(worker.ask('rate', mode))
            if not args.no_memory:
                for worker, subject in zip(workers, subjects):
                    subject.peak[mode] = worker.ask('peak', mode)
    finally:
        for worker in workers:
            if worker.process.is_alive():
                worker.ask('stop')
    return subjects


# allocations and bookkeeping: no kernel is launched for them
NOT_LAUNCHES = {'aten::empty', 'aten::empty_like', 'aten::empty_strided', 'aten::new_empty',
                'aten::new_empty_strided', 'aten::set_', 'aten::detach', 'aten::promote_types'}


def _triton_kernels():
    return sys.modules.get('timm_denseres._triton_kernels')


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations that launch a kernel (views and allocations left out) by name; the gate's Triton
    launches are added by :func:`count_ops`, and the operations Triton's interpreter runs for them left out."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        triton = _triton_kernels()
        if not (is_view or schema.name in NOT_LAUNCHES or (triton is not None and triton.launching[0])):
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(name: str, size: int, batch_size: int = 2, device: str = 'cpu') -> collections.Counter:
    """Operations of one SGD training step of ``name`` (after one step not counted), Triton launches included."""
    torch.manual_seed(0)
    model = timm.create_model(name).train().to(device)
    # learning rate 0: the same operations, on weights that stay finite (a step at 8 px and batch 2 can blow up)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, foreach=True)
    x = torch.randn(batch_size, 3, size, size, device=device)
    target = torch.randint(0, model.num_classes, (batch_size,), device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    train_step()
    launches_before = _triton_kernels().launches[0] if _triton_kernels() else 0
    with OperationCounter() as counter:
        train_step()
    if _triton_kernels():
        counter.counts['triton launch'] += _triton_kernels().launches[0] - launches_before
    return counter.counts


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_table(results: List[Tuple[str, int, List[Subject]]], args) -> str:
    modes = args.modes
    head = ['device', 'model', 'img', 'params (M)', 'GMACs']
    head += [f'{m} img/s' for m in modes]
    head += [f'{m} peak MB' for m in modes] if not args.no_memory else []
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for device, size, (model, base) in results:
        for s in (model, base):
            row = [device, s.name, str(size), f'{s.params / 1e6:.2f}', _fmt(s.macs and s.macs / 1e9, '.3f')]
            row += [f'{statistics.median(s.rates[m]):.1f}' for m in modes]
            row += [f'{s.peak[m] / 2 ** 20:.0f}' for m in modes] if not args.no_memory else []
            lines.append('| ' + ' | '.join(row) + ' |')
        row = [device, f'**ratio** {model.name} / {base.name}', str(size), f'{model.params / base.params:.3f}',
               _fmt(model.macs and base.macs and model.macs / base.macs, '.3f')]
        row += [f'**{_ratio_of_medians_per_repeat(model.rates[m], base.rates[m]):.3f}**' for m in modes]
        row += [f'**{model.peak[m] / base.peak[m]:.3f}**' for m in modes] if not args.no_memory else []
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS),
                        help='baselines to compare with their DenseResNet: ' + ', '.join(
                            f'{b} (vs {m}, {s}px)' for b, (m, s) in PAIRS.items()))
    parser.add_argument('--model', help='any timm model (with --baseline) instead of --pairs')
    parser.add_argument('--baseline', help='the model to divide by')
    parser.add_argument('--img-size', type=int, help='image size (default: the pair\'s, 224 for --model)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--devices', nargs='+', default=None, help='default: cpu, and cuda when present')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--repeats', type=int, default=5, help='interleaved timed repeats per model and mode')
    parser.add_argument('--min-time', type=float, default=1.0, help='seconds per timed repeat (at least one step)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model and mode')
    parser.add_argument('--timer', default='wall', choices=['wall', 'cpu'],
                        help="'cpu': images per second of process CPU time (CPU device only; for a busy machine)")
    parser.add_argument('--malloc', default='default', choices=['default', 'steady'],
                        help="'steady': glibc keeps freed memory in the heap (no trimming, no fresh mmap per large "
                             "tensor), which removes page-fault noise from CPU timings (see STEADY_MALLOC_ENV)")
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--amp-dtype', default='none', choices=list(AMP_DTYPES))
    parser.add_argument('--compile', nargs='?', const='default', choices=['default', 'reduce-overhead', 'max-autotune'],
                        help="torch.compile both models, in this mode ('reduce-overhead': CUDA graphs)")
    parser.add_argument('--cuda-graph', action='store_true',
                        help='CUDA only: each step of both models, eager (the gates on their CUDA kernels), captured '
                             'in a CUDA graph and replayed')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--no-macs', action='store_true', help='skip counting multiply-adds')
    parser.add_argument('--count-ops', action='store_true',
                        help='count the operations of one training step per model instead of timing (see above)')
    parser.add_argument('--json', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if (args.model is None) != (args.baseline is None):
        parser.error('--model and --baseline go together')
    if args.devices is None:
        args.devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    if args.cuda_graph and (args.compile or args.amp_dtype == 'float16' or args.devices != ['cuda']):
        parser.error('--cuda-graph takes --devices cuda alone, without --compile (reduce-overhead makes its own '
                     'graphs) and without float16 (its loss scaling reads the GPU from the host every step)')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.model:
        jobs = [((args.model, args.baseline), args.img_size or 224)]
    else:
        jobs = [((PAIRS[b][0], b), args.img_size or PAIRS[b][1]) for b in args.pairs]
    require_models([name for names, _ in jobs for name in names])
    torch.set_num_threads(args.threads)
    if args.count_ops:
        return print_op_counts(jobs, args)

    load_before = os.getloadavg()
    start = time.time()
    results = []
    for device_name in args.devices:
        device = torch.device(device_name)
        for names, size in jobs:
            print(f'measuring {names[0]} vs {names[1]} at {size}px on {device_name} ...', flush=True)
            results.append((device_name, size, benchmark_pair(names, size, device, args)))
    load_after = os.getloadavg()

    gpu = f', {torch.cuda.get_device_name()}' if 'cuda' in args.devices else ''
    print(f'\ntorch {torch.__version__}, timm {timm.__version__}, {args.threads} CPU threads{gpu}; batch '
          f'{args.batch_size}, {args.repeats} interleaved repeats of >= {args.min_time:g}s ({args.timer} time), '
          f'malloc {args.malloc}, channels_last {args.channels_last}, amp {args.amp_dtype}, compile {args.compile}, '
          f'cuda graph {args.cuda_graph}; {time.time() - start:.0f}s; '
          f'load average (1/5/15 min) before {"/".join(f"{x:.1f}" for x in load_before)}, '
          f'after {"/".join(f"{x:.1f}" for x in load_after)} on {os.cpu_count()} CPUs\n')
    print(format_table(results, args))


def print_op_counts(jobs, args) -> None:
    device = (args.devices or ['cpu'])[0] if args.devices != ['cpu', 'cuda'] else 'cpu'
    path = ('Triton' if os.environ.get('TRITON_INTERPRET') == '1' or device == 'cuda' else 'CPU kernels'
            if os.environ.get('TIMM_DENSERES_FUSED', '1') != '0' else 'formula')
    print(f'operations per training step (batch 2, {device}; gate path: {path}; torch {torch.__version__})\n')
    print('| model | baseline | model ops | baseline ops | ratio |\n|---|---|---|---|---|')
    results = []
    for (model, base), size in jobs:
        counts = [sum(count_ops(name, size, device=device).values()) for name in (model, base)]
        results.append(dict(model=model, baseline=base, img_size=size, model_ops=counts[0], baseline_ops=counts[1],
                            ratio=counts[0] / counts[1], gate_path=path))
        print(f'| {model} | {base} | {counts[0]} | {counts[1]} | **{counts[0] / counts[1]:.2f}** |', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
