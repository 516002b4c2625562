"""scripts/benchmark.py: the table it prints (not the speeds, which depend on the machine)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import timm_denseres  # noqa: F401  registers the models

SCRIPT = Path(__file__).resolve().parent.parent / 'scripts' / 'benchmark.py'
sys.path.insert(0, str(SCRIPT.parent))
import benchmark  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


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
    it; the pooled means only feed the gate head, which is constant by then), everything is restored afterwards,
    and the table has a row per variant and the baseline."""
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
        outputs, replaced = [], []
        for variant in gate_costs.VARIANTS:
            with gate_costs.stand_ins(variant):
                outputs.append(model(x))
                now = DenseGate.weights_for, DenseGate.__dict__['mix'], dense_resnet.global_avg_pool
                replaced.append([a is not b for a, b in zip(now, original)])
        assert replaced == [[False, False, False], [True, False, False], [True, False, True], [True, True, True]]
        assert torch.equal(outputs[0], ref)
        assert not torch.allclose(outputs[1], ref) and not torch.allclose(outputs[3], outputs[2])
        assert torch.equal(model(x), ref)
    assert (DenseGate.weights_for, DenseGate.__dict__['mix'], dense_resnet.global_avg_pool) == original

    with pytest.raises(SystemExit, match='unknown model'):
        gate_costs.main(['--model', 'denseresnet_nope', '--malloc', 'default'])
    gate_costs.main(['--model', 'denseresnet110_n2', '--img-size', '16', '--batch-size', '2', '--repeats', '1',
                     '--min-time', '0', '--threads', '1', '--malloc', 'default'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert [r.split('|')[1].strip() for r in rows[1:]] == gate_costs.VARIANTS + ['baseline']
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip('|').split('|')][1:]
        assert len(cells) == 4 and all(float(c) > 0 for c in cells)
