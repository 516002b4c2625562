"""tools/benchmark.py: the table it prints (not the speeds, which depend on the machine)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import timm_denseres  # noqa: F401  registers the models

SCRIPT = Path(__file__).resolve().parent.parent / 'tools' / 'benchmark.py'
sys.path.insert(0, str(SCRIPT.parent))
import benchmark  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    # this tree's package in the script and its workers, whatever else is installed
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), os.environ.get('PYTHONPATH')]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': path})


def test_table_for_a_pair_in_worker_processes():
    """Tiny settings: both models are built in their worker processes, timed and measured; the table has a row per
    model with its real parameter count and a ratio row whose parameter ratio is the models' own."""
    result = _run('--model', 'denseresnet20_n2', '--baseline', 'resnet20', '--img-size', '16', '--batch-size', '2',
                  '--repeats', '2', '--min-time', '0', '--warmup', '1', '--threads', '1', '--malloc', 'steady')
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) == 9 and cells[0] == 'cpu':
            rows[cells[1]] = cells
    params = {n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in ('denseresnet20_n2', 'resnet20')}
    for name in params:
        assert float(rows[name][3]) == pytest.approx(params[name] / 1e6, abs=0.005)
        assert all(float(c) > 0 for c in rows[name][4:])  # MACs, infer/train img/s, peak MB
    ratio = rows['**ratio** denseresnet20_n2 / resnet20']
    assert float(ratio[3]) == pytest.approx(params['denseresnet20_n2'] / params['resnet20'], abs=0.001)
    assert float(ratio[4]) > 1  # the gates add multiply-adds
    assert all(re.fullmatch(r'\*\*\d+\.\d{3}\*\*', c) for c in ratio[5:])
    assert 'malloc steady' in result.stdout
    # the CPU memory profile logs nothing: no Kineto start/stop lines, no c10 allocator warning
    for noise in ('profiler_start', 'profiler_stop', 'gpuGetDeviceCount', 'CPUAllocator'):
        assert noise not in result.stderr


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match=r'^unknown model\(s\): denseresnet_nope$'):
        benchmark.main(['--model', 'denseresnet_nope', '--baseline', 'resnet20'])


def test_ratio_is_the_median_of_the_per_repeat_ratios():
    # a slow repeat of the model meets a slow repeat of the baseline: the per-repeat ratio stays 0.5
    assert benchmark._ratio_of_medians_per_repeat([10, 5, 10], [20, 10, 20]) == 0.5
    assert benchmark._ratio_of_medians_per_repeat([1, 2, 30], [2, 2, 3]) == 1.0


@pytest.mark.parametrize('flags', [['--devices', 'cpu'], ['--devices', 'cuda', '--compile', 'reduce-overhead'],
                                   ['--devices', 'cuda', '--amp-dtype', 'float16']])
def test_cuda_graph_refuses_what_it_cannot_capture(flags, capsys):
    """A CPU step, a compiled one (reduce-overhead makes its own graphs) and float16's loss scaling (it reads the
    GPU from the host every step) cannot be captured: a usage error says so before any model is built."""
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(['--cuda-graph', *flags])
    assert exit_info.value.code == 2
    assert '--cuda-graph takes --devices cuda alone' in capsys.readouterr().err
