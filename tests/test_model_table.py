"""Sizes and multiply-adds against the paper's Tables 1 and 2, measured live."""
import pytest
import timm
import torch

import timm_denseres  # noqa: F401
from timm_denseres.flops import count_macs
from timm_denseres.model_table import format_table, measure_models
from timm_denseres.paper import PAPER_TABLE, baseline_of


@pytest.fixture(scope='module')
def rows():
    torch.set_num_threads(2)
    return {r['name']: r for r in measure_models()}


@pytest.mark.parametrize('name', [n for n in PAPER_TABLE])
def test_params_equal_paper_at_0_01m(rows, name):
    if name not in rows:
        pytest.skip(f'{name} is not registered yet')
    assert round(rows[name]['params_m'], 2) == PAPER_TABLE[name].params_m


@pytest.mark.parametrize('name', ['resnet34', 'resnet110', 'mobilenetv2_100'])
def test_baseline_macs_within_1pct_of_paper(rows, name):
    paper = PAPER_TABLE[name].macs_m
    assert abs(rows[name]['macs_m'] - paper) / paper < 0.01


def test_resnet34_conv_linear_macs_within_1pct(rows):
    assert abs(rows['resnet34']['conv_linear_m'] - 3680) / 3680 < 0.01


def test_dense_models_cost_a_little_more_than_their_baseline(rows):
    for name, row in rows.items():
        base = baseline_of(name)
        if base is None:
            continue
        assert row['increase_m'] > 0
        # the gates are cheap: well under 1 % of the baseline's multiply-adds
        assert row['increase_m'] / rows[base]['macs_m'] < 0.05
        assert row['conv_linear_m'] > rows[base]['conv_linear_m']  # the gates' 1x1 layers


def test_table_lists_every_measured_model(rows):
    text = format_table(list(rows.values()))
    for name in rows:
        assert f'| {name} |' in text
    assert 'DIFFERS' not in text


def test_merge_count_follows_the_gate_rule():
    """The weighted sum costs one multiply-add per element per inbound plus one for v; a residual add one."""
    plain = count_macs(timm.create_model('resnet110'), (3, 32, 32))
    dense = count_macs(timm.create_model('denseresnet110_n2'), (3, 32, 32))
    per_stage = [16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8]
    assert plain['merge'] == 18 * sum(per_stage)
    # block 1 has one inbound (v + 1), every later block two (v + 2); in the first two blocks of stages 2 and 3 the
    # older inbound is an output of the stage before, half as wide: its zero padding is skipped (v + 1.5)
    assert dense['merge'] == (2 * per_stage[0] + 17 * 3 * per_stage[0] + 18 * 3 * (per_stage[1] + per_stage[2])
                              - (per_stage[1] + per_stage[2]))
