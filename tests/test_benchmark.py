"""scripts/benchmark.py: the table it prints (not the speeds, which depend on the machine)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import timm_denseres  # noqa: F401  registers the models
from timm_denseres import fused

SCRIPT = Path(__file__).resolve().parent.parent / 'scripts' / 'benchmark.py'
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
    result = _run('--model', 'denseresnet110_n2', '--baseline', 'resnet110', '--img-size', '16', '--batch-size', '2',
                  '--repeats', '2', '--min-time', '0', '--warmup', '1', '--threads', '1', '--malloc', 'steady')
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) == 9 and cells[0] == 'cpu':
            rows[cells[1]] = cells
    params = {n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in ('denseresnet110_n2', 'resnet110')}
    for name in params:
        assert float(rows[name][3]) == pytest.approx(params[name] / 1e6, abs=0.005)
        assert all(float(c) > 0 for c in rows[name][4:])  # MACs, infer/train img/s, peak MB
    ratio = rows['**ratio** denseresnet110_n2 / resnet110']
    assert float(ratio[3]) == pytest.approx(params['denseresnet110_n2'] / params['resnet110'], abs=0.001)
    assert float(ratio[4]) > 1  # the gates add multiply-adds
    assert all(re.fullmatch(r'\*\*\d+\.\d{3}\*\*', c) for c in ratio[5:])
    assert 'malloc steady' in result.stdout
    # the CPU memory profile logs nothing: no Kineto start/stop lines, no c10 allocator warning
    for noise in ('profiler_start', 'profiler_stop', 'gpuGetDeviceCount', 'CPUAllocator'):
        assert noise not in result.stderr


def test_unknown_model_is_a_clear_error():
    result = _run('--model', 'denseresnet_nope', '--baseline', 'resnet110')
    assert result.returncode != 0
    assert 'unknown model(s): denseresnet_nope' in result.stderr


def test_ratio_is_the_median_of_the_per_repeat_ratios():
    # a slow repeat of the model meets a slow repeat of the baseline: the per-repeat ratio stays 0.5
    assert benchmark._ratio_of_medians_per_repeat([10, 5, 10], [20, 10, 20]) == 0.5
    assert benchmark._ratio_of_medians_per_repeat([1, 2, 30], [2, 2, 3]) == 1.0


def test_gate_costs_stand_ins_change_the_output_and_are_undone(capsys):
    """scripts/gate_costs.py: each stand-in replaces its part of the gate (the ones that feed the output change
    it; the pooled means only feed the gate head, which is constant by then), the compiled head runs in ``full``
    only and the weighted-sum kernel in the two variants before ``pytorch-ops``, everything is restored
    afterwards, and the table has a row per variant, the baseline and the bound."""
    import torch

    import gate_costs
    import timm_denseres.resnet as dense_resnet
    from timm_denseres.gate import DenseGate

    torch.manual_seed(0)
    model = timm.create_model('denseresnet110_n2', num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    original = DenseGate.weights_for, DenseGate.__dict__['mix'], dense_resnet.global_avg_pool
    with torch.no_grad():
        ref = model(x)
        outputs, replaced, ops_used = [], [], []
        for variant in gate_costs.VARIANTS:
            with gate_costs.stand_ins(variant), torch.profiler.profile() as prof:
                outputs.append(model(x))
                now = DenseGate.weights_for, DenseGate.__dict__['mix'], dense_resnet.global_avg_pool
                replaced.append([a is not b for a, b in zip(now, original)])
            ops_used.append({e.name for e in prof.events() if e.name.startswith('timm_denseres::')})
        assert replaced == [[False] * 3, [True, False, False], [True, False, False], [True, False, True],
                            [True, True, True]]
        kernels = fused.kernel_available()
        assert ops_used == [{'timm_denseres::gate_mix', 'timm_denseres::gate_head_eval'} if kernels else set(),
                            {'timm_denseres::gate_mix'} if kernels else set(), set(), set(), set()]
        assert torch.equal(outputs[0], ref)
        assert not torch.allclose(outputs[1], ref)
        torch.testing.assert_close(outputs[2], outputs[1], rtol=1e-5, atol=1e-5)  # the kernel's sum, by PyTorch ops
        assert torch.equal(outputs[3], outputs[2]) and not torch.allclose(outputs[4], outputs[3])
        assert torch.equal(model(x), ref)
    assert (DenseGate.weights_for, DenseGate.__dict__['mix'], dense_resnet.global_avg_pool) == original

    with pytest.raises(SystemExit, match='unknown model'):
        gate_costs.main(['--model', 'denseresnet_nope', '--malloc', 'default'])
    gate_costs.main(['--model', 'denseresnet110_n2', '--img-size', '16', '--batch-size', '2', '--repeats', '1',
                     '--min-time', '0', '--threads', '1', '--malloc', 'default'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    names = [r.split('|')[1].strip() for r in rows[1:]]
    assert names == gate_costs.VARIANTS + ['baseline', gate_costs.FUSED_SUM_BOUND]
    table = {}
    for row in rows[1:]:
        name, *cells = [c.strip() for c in row.strip('|').split('|')]
        assert len(cells) == 4
        table[name] = [float(c) for c in cells]
    for ms, ratio in ((0, 1), (2, 3)):  # infer, train: ms per step, baseline / variant
        bound = table['full'][ms] - (table['constant-weights'][ms] - table['plain-add'][ms])
        assert table[gate_costs.FUSED_SUM_BOUND][ms] == pytest.approx(bound, abs=0.2)  # three cells rounded to 0.1
        assert table[gate_costs.FUSED_SUM_BOUND][ratio] == pytest.approx(
            table['baseline'][ms] / table[gate_costs.FUSED_SUM_BOUND][ms], rel=0.02)
        assert all(row[ms] > 0 for name, row in table.items() if name != gate_costs.FUSED_SUM_BOUND)
