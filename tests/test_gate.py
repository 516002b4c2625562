"""The Gate-Module's defining properties (../shared/denseresnet.md) and the gate inspection API."""
import pytest
import timm
import torch

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.gate import GateBatchNorm, gate_hidden_channels
from timm_denseres.gate_stats import gate_modules, record_gates


@pytest.mark.parametrize('channels,reduction,hidden', [(64, 8, 8), (512, 8, 64), (16, 2, 8), (24, 4, 8), (320, 4, 80),
                                                       (3, 8, 8)])
def test_gate_hidden_width_rule(channels, reduction, hidden):
    assert gate_hidden_channels(channels, reduction) == hidden


@pytest.mark.parametrize('name,size', [('denseresnet110_n4', 32), ('denseresnet110_n8', 27), ('denseresnet34_n6', 64)])
def test_mixing_weights_sum_to_one_and_padding_is_masked(name, size):
    model = timm.create_model(name).eval()
    with torch.no_grad(), record_gates(model):
        pass  # entering and leaving leaves no hooks behind
    assert all(not m._forward_hooks for m in model.modules())

    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, b=b: seen.__setitem__(b, out))
             for b, m in gate_modules(model).items()]
    with torch.no_grad():
        model(torch.randn(3, 3, size, size))
    for h in hooks:
        h.remove()

    blocks = list(seen)
    assert len(blocks) == sum(1 for _ in model.modules() if isinstance(_, timm_denseres.DenseBasicBlock))
    for block, (v, w) in seen.items():
        assert ((v > 0) & (v < 1)).all()
        torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]), rtol=0, atol=1e-6)
        gate = model.get_submodule(block).gate
        for k, valid in enumerate(gate.weights.valid_channels):
            # channels that zero-padding created in an earlier output get no weight
            assert (w[:, k, valid:] == 0).all(), (block, k)
            if k > 0 and valid < gate.channels:
                assert (w[:, k, :valid] > 0).all()


def _zero_branches(model):
    for block in model.modules():
        if isinstance(block, timm_denseres.DenseBasicBlock):
            torch.nn.init.zeros_(block.bn2.weight)
            torch.nn.init.zeros_(block.bn2.bias)


@pytest.mark.parametrize('name,size', [('denseresnet110_n4', 32), ('denseresnet34_n6', 64), ('denseresnet34_n8', 65)])
def test_identity_path_survives_with_zero_branches(name, size):
    """Paper eq. 2-5: with every branch at zero the mixing weights sum to one, so x_i = x_0 until the first
    projection shortcut (conv1x1+BN, which has parameters, changes the identity path of a ResNet)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    _zero_branches(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        stem = model.maxpool(model.forward_stem(x))
        stage1 = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        # every stage-1 block, not only the last, passes x_0 through
        history = [stem]
        for block in model.layer1:
            history = block(history)
            torch.testing.assert_close(history[-1], stem, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stage1, stem, rtol=1e-6, atol=1e-6)


def test_identity_gates_with_resnet34_weights_give_resnet34_logits():
    torch.manual_seed(0)
    resnet = timm.create_model('resnet34').eval()
    for m in resnet.modules():  # non-trivial BN statistics, so the comparison means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    dense = timm.create_model('denseresnet34_n6').eval()
    missing, unexpected = dense.load_state_dict(resnet.state_dict(), strict=False)
    assert not unexpected
    assert missing and all('.gate.' in k for k in missing)
    dense.set_gates_identity()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref, out = resnet(x), dense(x)
    max_abs = (ref - out).abs().max().item()
    print(f'denseresnet34_n6 (identity gates) vs resnet34: max |logit diff| = {max_abs:.3g}')
    assert max_abs < 1e-5


def test_gate_batchnorm_single_sample_uses_running_stats():
    bn = GateBatchNorm(8).train()
    bn.running_mean.fill_(0.5)
    before = bn.running_mean.clone()
    x = torch.randn(1, 8, 1, 1)
    out = bn(x)
    torch.testing.assert_close(bn.running_mean, before)
    torch.testing.assert_close(out, (x - 0.5) / torch.sqrt(torch.tensor(1.0 + bn.eps)))
    bn(torch.randn(4, 8, 1, 1))  # a real batch updates the statistics
    assert not torch.equal(bn.running_mean, before)


def test_record_gates_means_over_batches():
    model = timm.create_model('denseresnet110_n2').eval()
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        with record_gates(model) as both:
            model(a)
            model(b)
        with record_gates(model) as joint:
            model(torch.cat([a, b]))
    for block, w in joint.w_mean().items():
        assert w == pytest.approx(both.w_mean()[block], abs=1e-5)
        assert sum(w) == pytest.approx(1.0, abs=1e-5)
        assert len(w) == min(2, list(joint.w_mean()).index(block) + 1)
    assert both.v_mean() == pytest.approx(joint.v_mean(), abs=1e-5)


def test_record_gates_rejects_a_model_without_gates():
    with pytest.raises(ValueError, match='no DenseResNet gates'):
        with record_gates(timm.create_model('resnet110')):
            pass
