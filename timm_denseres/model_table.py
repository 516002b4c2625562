"""The model table: every model's parameters and multiply-adds, measured live, beside the paper's."""
from typing import Dict, List, Optional

import timm

from .flops import count_macs
from .paper import PAPER_TABLE, baseline_of

__all__ = ['measure_models', 'format_table', 'TABLE_MODELS']

TABLE_MODELS = [
    'resnet34', 'denseresnet34_n2', 'denseresnet34_n4', 'denseresnet34_n6', 'denseresnet34_n8',
    'resnet110', 'denseresnet110_n2', 'denseresnet110_n4', 'denseresnet110_n6', 'denseresnet110_n8',
    'mobilenetv2_100', 'densemobilenetv2_n4',
    'resnet20', 'denseresnet20_n4', 'resnet56', 'denseresnet56_n4',  # not in the paper: sized for CPU studies
]
_CIFAR_INPUT = (3, 32, 32)  # the input of the CIFAR-layout models that are not in the paper


def measure_models(names: Optional[List[str]] = None) -> List[Dict]:
    """Build each model (no weights) and measure params and MACs at the paper's input size."""
    rows = []
    for name in names or TABLE_MODELS:
        if name not in timm.list_models():
            continue  # a family not built yet
        paper = PAPER_TABLE.get(name)
        model = timm.create_model(name, num_classes=100 if paper is None or paper.dataset == 'CIFAR-100' else 1000)
        macs = count_macs(model, paper.input_size if paper else _CIFAR_INPUT)
        rows.append(dict(
            name=name,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            conv_linear_m=macs['conv_linear'] / 1e6,
            macs_m=macs['total'] / 1e6,
            paper=paper,
        ))
    by_name = {r['name']: r for r in rows}
    for row in rows:
        base = by_name.get(baseline_of(row['name']) or '')
        if base is not None:
            row['increase_m'] = row['macs_m'] - base['macs_m']
            if row['paper'] and base['paper']:
                row['paper_increase_m'] = row['paper'].macs_m - base['paper'].macs_m
    return rows


def _pct(value: float, ref: float) -> str:
    return f'{100 * (value - ref) / ref:+.2f}%'


def format_table(rows: List[Dict]) -> str:
    """Markdown table: params vs paper (0.01 M), MACs vs paper, and each dense model's increase over its base."""
    lines = [
        '| model | params (M) | paper | conv+linear MACs (M) | all MACs (M) | paper MACs (M) | diff |'
        ' increase over baseline (M) | paper increase (M) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        p = r['paper']
        inc = f"{r['increase_m']:+.1f}" if 'increase_m' in r else 'baseline'
        pinc = f"{r['paper_increase_m']:+.0f}" if 'paper_increase_m' in r else ''
        if p is None:
            lines.append(f"| {r['name']} | {r['params_m']:.2f} | not in the paper | {r['conv_linear_m']:.1f} |"
                         f" {r['macs_m']:.1f} |  |  | {inc} |  |")
            continue
        same = 'ok' if round(r['params_m'], 2) == p.params_m else 'DIFFERS'
        lines.append(
            f"| {r['name']} | {r['params_m']:.2f} ({same}) | {p.params_m:.2f} | {r['conv_linear_m']:.1f} |"
            f" {r['macs_m']:.1f} | {p.macs_m:.0f} | {_pct(r['macs_m'], p.macs_m)} | {inc} | {pinc} |")
    return '\n'.join(lines)
