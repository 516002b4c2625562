"""The GPU check of the gate's CUDA path, in one run that writes one JSON:

1. correctness: logits (eval) and parameter gradients (training mode) of each dense model on the GPU in float32,
   TF32 off, against the same model in float64 on the CPU (the formula); bf16 autocast + channels_last against
   float32; whether the Triton path ran (torch.compile takes the formula, which the benchmark compiles);
2. benchmark: tools/benchmark.py's interleaved throughput and peak memory, dense / baseline, for each pair at its
   size and batch (fp32; bf16 autocast + channels_last; each step in a CUDA graph; compiled, where asked);
3. train: one short epoch of timm's train.py with --amp on Fashion-MNIST through scripts/train.py.

    PYTHONPATH=. python tools/gpu_check.py --json results/gpu_check.json
    PYTHONPATH=. python tools/gpu_check.py --parts correctness --device cpu   # a smoke test without a GPU

A development tool: it measures this repository's code on whatever GPU runs it.
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F

import timm_denseres  # noqa: F401  registers the models
from timm_denseres import _backends

ROOT = Path(__file__).resolve().parent.parent
# dense model, baseline, image size, batch (the GPU table of docs/speed.md)
PAIRS = [('denseresnet110_n4', 'resnet110', 32, 128), ('denseresnet34_n6', 'resnet34', 224, 64),
         ('densemobilenetv2_n4', 'mobilenetv2_100', 224, 64)]


def _launches() -> int:
    module = sys.modules.get('timm_denseres._triton_kernels')
    return module.launches[0] if module else 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def correctness(device: torch.device, batch: int = 4) -> List[Dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for name, _, size, _ in PAIRS:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10)
        with torch.no_grad():  # gates away from their start, so that every inbound counts
            for block in model.dense_blocks():
                block.gate.fc2.weight.normal_(0, 0.1)
                block.gate.fc2.bias.normal_(0, 1)
        x = torch.randn(batch, 3, size, size)
        target = torch.randint(0, 10, (batch,))
        reference = model.double().train()
        loss = F.cross_entropy(reference(x.double()), target)
        ref_grads = torch.autograd.grad(loss, list(reference.parameters()))
        reference.eval()
        with torch.no_grad():
            ref_logits = reference(x.double())
        model = model.float()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        cpu_grads = torch.autograd.grad(F.cross_entropy(model.train()(x), target), list(model.parameters()))
        model.load_state_dict(state)
        model = model.to(device)
        before = _launches()
        model.train()
        grads = torch.autograd.grad(F.cross_entropy(model(x.to(device)), target.to(device)),
                                    list(model.parameters()))
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            logits = model(x.to(device))
            triton_used = _launches() > before
            with _backends.kernels_disabled():
                formula = model(x.to(device))
            cl_model = model.to(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = cl_model(x.to(device).contiguous(memory_format=torch.channels_last)).float()
        results.append(dict(
            model=name, batch=batch, size=size, triton_path=triton_used,
            logits_rel_err_vs_cpu_float64=_rel(logits.cpu(), ref_logits),
            formula_logits_rel_err_vs_cpu_float64=_rel(formula.cpu(), ref_logits),
            grads_rel_err_vs_cpu_float64=_rel(torch.cat([g.cpu().flatten() for g in grads]),
                                              torch.cat([r.flatten() for r in ref_grads])),
            cpu_float32_grads_rel_err_vs_cpu_float64=_rel(torch.cat([g.flatten() for g in cpu_grads]),
                                                          torch.cat([r.flatten() for r in ref_grads])),
            bf16_channels_last_rel_err_vs_fp32=_rel(bf16, logits)))
        print(json.dumps(results[-1]), flush=True)
    return results


def benchmark(device: torch.device, configs: List[str], repeats: int, min_time: float, results: List[Dict],
              save: Callable[[], None]) -> List[Dict]:
    """Appends a row per pair and set-up to ``results`` and saves after each (a time limit keeps what ran)."""
    sys.path.insert(0, str(ROOT / 'tools'))  # by name: its worker processes import it again
    import benchmark as bench
    flags = {'fp32': [], 'bf16_cl': ['--amp-dtype', 'bfloat16', '--channels-last'],
             'bf16_cl_reduce_overhead': ['--amp-dtype', 'bfloat16', '--channels-last', '--compile', 'reduce-overhead'],
             'fp32_reduce_overhead': ['--compile', 'reduce-overhead'],
             'bf16_cl_cuda_graph': ['--amp-dtype', 'bfloat16', '--channels-last', '--cuda-graph'],
             'fp32_cuda_graph': ['--cuda-graph']}
    for config in configs:
        compiled = 'reduce_overhead' in config
        for model, base, size, batch in PAIRS[:1] if compiled else PAIRS:  # compiling: the launch-bound pair
            start = time.time()
            try:  # a set-up the device cannot run is a usage error of benchmark.py (SystemExit): recorded too
                args = bench.parse_args(['--devices', device.type, '--batch-size', str(batch), '--img-size',
                                         str(size), '--model', model, '--baseline', base, '--repeats', str(repeats),
                                         '--min-time', str(min_time), '--warmup', '5' if compiled else '3',
                                         '--no-macs', *flags[config]])
                dense, baseline = bench.benchmark_pair((model, base), size, device, args)
            except (Exception, SystemExit) as e:  # noqa: BLE001  record it and go on with the next
                results.append(dict(config=config, model=model, baseline=base, error=f'{type(e).__name__}: {e}'))
                print(json.dumps(results[-1]), flush=True)
                save()
                continue
            row = dict(config=config, model=model, baseline=base, img_size=size, batch=batch,
                       seconds=round(time.time() - start, 1))
            for mode in args.modes:
                row[f'{mode}_img_s'] = [bench.statistics.median(s.rates[mode]) for s in (dense, baseline)]
                row[f'{mode}_ratio'] = bench._ratio_of_medians_per_repeat(dense.rates[mode], baseline.rates[mode])
                row[f'{mode}_peak_mb'] = [s.peak[mode] / 2 ** 20 for s in (dense, baseline)]
                row[f'{mode}_memory_ratio'] = dense.peak[mode] / baseline.peak[mode]
            results.append(row)
            print(json.dumps(row), flush=True)
            save()
    return results


def train_epoch(device: torch.device, data_dir: str, output: str) -> Dict:
    command = [sys.executable, 'scripts/train.py', '--config', 'recipes/fmnist_study.yaml', '--data-dir', data_dir,
               '--model', 'denseresnet20_n4', '--device', device.type, '--amp', '--epochs', '1', '--output', output,
               '--experiment', 'amp-epoch', '--workers', '4']
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = Path(ROOT / output / 'amp-epoch' / 'summary.csv')
    return dict(command=' '.join(command[1:]), returncode=result.returncode, seconds=round(time.time() - start, 1),
                summary=summary.read_text() if summary.is_file() else None,
                stderr_tail=result.stderr[-2000:] if result.returncode else '')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--parts', nargs='+', default=['correctness', 'benchmark', 'train'],
                        choices=['correctness', 'benchmark', 'train'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--configs', nargs='+', default=['fp32', 'bf16_cl', 'bf16_cl_cuda_graph', 'bf16_cl_reduce_overhead'],
                        help='benchmark set-ups: fp32, bf16_cl, bf16_cl_cuda_graph (eager, each step in a CUDA graph), '
                             'fp32_cuda_graph, bf16_cl_reduce_overhead, fp32_reduce_overhead (torch.compile)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--min-time', type=float, default=0.3)
    parser.add_argument('--data-dir', default='data/sample/fashion-mnist',
                        help='the --amp epoch\'s data (default: the committed sample, which needs no download)')
    parser.add_argument('--output', default='runs/gpu_check')
    parser.add_argument('--json', default='results/gpu_check.json')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor(),
                  torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                  triton=getattr(sys.modules.get('triton'), '__version__', None),
                  command='PYTHONPATH=. python tools/gpu_check.py ' + ' '.join(argv or sys.argv[1:]))
    path = Path(args.json)

    def save():
        report['triton'] = report['triton'] or getattr(sys.modules.get('triton'), '__version__', None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + '\n')

    for part in args.parts:
        start = time.time()
        try:
            if part == 'correctness':
                report[part] = correctness(device)
            elif part == 'benchmark':
                report[part] = []
                benchmark(device, args.configs, args.repeats, args.min_time, report[part], save)
            else:
                report[part] = train_epoch(device, args.data_dir, args.output)
        except Exception as e:  # noqa: BLE001  one part's failure is a result too
            report[part] = dict(error=f'{type(e).__name__}: {e}')
        report[f'{part}_seconds'] = round(time.time() - start, 1)
        save()
        print(f'{part} done in {time.time() - start:.0f} s', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
