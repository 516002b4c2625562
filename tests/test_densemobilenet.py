"""DenseMobileNetV2: timm's mobilenetv2_100 with a Gate-Module in every block."""
import pytest
import timm
import torch
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_denseres  # noqa: F401  registers the models
from helpers import num_params, randomise, reference_adjust, zero_branches
from timm_denseres._dense import History, pad_channels
from timm_denseres.densemobilenet import DenseDepthwiseSeparableConv, DenseInvertedResidual, DenseMobileBlock
from timm_denseres.gate_stats import gate_modules
from timm_denseres.paper import PAPER_TABLE

VARIANTS = [f'densemobilenetv2_n{n}' for n in (2, 4, 6, 8)]


def _blocks(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DenseMobileBlock)]


def test_param_counts_match_the_paper_and_grow_with_n():
    base = timm.create_model('mobilenetv2_100', device='meta')
    dense = {n: timm.create_model(n, device='meta') for n in VARIANTS}
    assert round(num_params(base) / 1e6, 2) == PAPER_TABLE['mobilenetv2_100'].params_m
    assert round(num_params(dense['densemobilenetv2_n4']) / 1e6, 2) == PAPER_TABLE['densemobilenetv2_n4'].params_m
    counts = [num_params(dense[n]) for n in VARIANTS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    for model in dense.values():
        # everything beyond MobileNetV2 is in the gates
        gate_params = sum(p.numel() for name, p in model.named_parameters() if '.gate.' in name)
        assert num_params(model) - gate_params == num_params(base)
        assert len(_blocks(model)) == 17


def test_layout_is_timms_mobilenetv2():
    """17 blocks: the first (t=1, no expansion) a depthwise-separable block, the other 16 inverted residuals,
    each with a gate; every shared tensor has timm's name and shape."""
    base = timm.create_model('mobilenetv2_100', device='meta').state_dict()
    model = timm.create_model('densemobilenetv2_n4', device='meta')
    blocks = _blocks(model)
    assert isinstance(blocks[0][1], DenseDepthwiseSeparableConv) and blocks[0][0] == 'blocks.0.0'
    assert all(isinstance(b, DenseInvertedResidual) for _, b in blocks[1:])
    dense = model.state_dict()
    assert {k: v.shape for k, v in dense.items() if '.gate.' not in k} == {k: v.shape for k, v in base.items()}
    gate_keys = {k.split('.gate.')[1] for k in dense if '.gate.' in k}
    assert {k.split('.')[0] for k in gate_keys} == {'fc1', 'bn', 'fc2'}


def test_pretrained_cfg_follows_timms_mobilenetv2():
    ref = timm.create_model('mobilenetv2_100', device='meta').pretrained_cfg
    for name in VARIANTS:
        cfg = timm.create_model(name, device='meta').pretrained_cfg
        for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'first_conv', 'classifier',
                    'pool_size', 'num_classes'):
            assert cfg[key] == ref[key], key
        assert cfg['paper_ids'] == 'MIRU2020'


def test_mobilenetv2_weights_fill_every_shared_weight():
    """A timm mobilenetv2_100 state dict leaves only the gates to their own init. With identity gates each block
    computes branch(x) + shortcut(x): timm's block exactly where timm has a skip (stride 1, same width), and timm's
    block plus the parameter-free shortcut where it has none, so the logits differ (reported, not equal)."""
    torch.manual_seed(0)
    ref = randomise(timm.create_model('mobilenetv2_100'), seed=0).eval()
    dense = timm.create_model('densemobilenetv2_n4').eval()
    missing, unexpected = dense.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected
    # (BatchNorm does not report a missing num_batches_tracked)
    assert set(missing) == {k for k in dense.state_dict() if '.gate.' in k and 'num_batches_tracked' not in k}
    assert {n for n, _ in dense.named_parameters() if '.gate.' in n} <= set(missing)
    dense.set_gates_identity()

    x = torch.randn(2, 3, 64, 64)
    ref_blocks = dict(ref.named_modules())
    with torch.no_grad():
        stem = dense.bn1(dense.conv_stem(x))
        torch.testing.assert_close(stem, ref.bn1(ref.conv_stem(x)), rtol=0, atol=0)
        history = History([stem], [stem.mean((2, 3))])
        with_skip = 0
        for name, block in _blocks(dense):
            inp = history.outputs[-1]
            history = block(history)
            timm_out = ref_blocks[name](inp)
            if ref_blocks[name].has_skip:
                with_skip += 1
                expected = timm_out
            else:
                expected = timm_out + reference_adjust(inp, block.out_chs, block.pool)
            torch.testing.assert_close(history.outputs[-1], expected, rtol=1e-5, atol=1e-5, msg=name)
        assert with_skip == 10  # the other 7 blocks gained a shortcut

        ref_logits, dense_logits = ref(x), dense(x)
    diff = (ref_logits - dense_logits).abs().max().item()
    agree = (ref_logits.argmax(1) == dense_logits.argmax(1)).float().mean().item()
    print(f'mobilenetv2_100 logits[0,:4]     {ref_logits[0, :4].tolist()}')
    print(f'densemobilenetv2_n4 logits[0,:4] {dense_logits[0, :4].tolist()} (identity gates)')
    print(f'max |logit diff| = {diff:.3g}, top-1 agreement {agree:.2f} (random weights, random BN statistics)')
    assert diff > 1e-3  # the 7 new shortcuts change the network: exact equality is impossible


@pytest.mark.parametrize('name,size', [('densemobilenetv2_n4', 64), ('densemobilenetv2_n8', 97)])
def test_identity_path_with_zero_branches(name, size):
    """Paper eq. 2-5: with every branch at zero, the weights summing to one keep x_i = P_i(x_0) exactly, P_i the
    parameter-free shortcuts (ceil-mode pool, channel cut/pad) of blocks 1..i, through every block."""
    torch.manual_seed(0)
    model = zero_branches(randomise(timm.create_model(name), seed=0).eval())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        stem = model.bn1(model.conv_stem(x))
        expected = stem
        history = History([stem], [stem.mean((2, 3))])
        for block_name, block in _blocks(model):
            history = block(history)
            if block.changes_shape:
                expected = reference_adjust(expected, block.out_chs, block.pool)
            torch.testing.assert_close(history.outputs[-1], expected, rtol=1e-6, atol=1e-6, msg=block_name)
        final = model.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
    assert final.shape[1] == 320 and expected.abs().sum() > 0
    torch.testing.assert_close(final, expected, rtol=1e-6, atol=1e-6)


def test_mixing_weights_sum_to_one_and_padding_is_masked():
    """x_i = v * f_i(x_{i-1}) + sum_k w_ik * a_k over the shortcut and x_{i-2}, x_{i-3}, ...; w sums to one per
    channel; a channel that zero padding created in an earlier output (really zero in the inbound the block sees)
    gets weight 0, and one that holds data does not."""
    torch.manual_seed(0)
    model = timm.create_model('densemobilenetv2_n4').eval()
    seen, inputs, outputs = {}, {}, {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, b=b: seen.__setitem__(b, out))
             for b, m in gate_modules(model).items()]
    hooks += [block.register_forward_pre_hook(lambda mod, args, b=name: inputs.__setitem__(b, args[0].outputs))
              for name, block in _blocks(model)]
    hooks += [block.register_forward_hook(lambda mod, args, out, b=name: outputs.__setitem__(b, out.outputs[-1]))
              for name, block in _blocks(model)]
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 64))
    for h in hooks:
        h.remove()

    blocks = _blocks(model)
    assert list(seen) == [name for name, _ in blocks]
    masked = 0
    for i, (name, block) in enumerate(blocks, start=1):
        v, w = seen[name]
        assert w.shape[1] == min(4, i)
        assert ((v > 0) & (v < 1)).all()
        torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]), rtol=0, atol=1e-6)
        # an entry narrower than the block stands for itself zero-padded
        history = [pad_channels(h, block.in_chs) for h in inputs[name]]
        with torch.no_grad():
            expected = v[:, :, None, None] * block.branch(history[-1])
        if block.changes_shape:
            history = [reference_adjust(h, block.out_chs, block.pool) for h in history]
        for k in range(w.shape[1]):  # k = 0: the shortcut (x_{i-1} adjusted), then x_{i-2}, ...
            expected = expected + w[:, k, :, None, None] * history[-1 - k]
        torch.testing.assert_close(outputs[name], expected, rtol=1e-5, atol=1e-5, msg=name)
        for k, valid in enumerate(block.gate.weights.valid_channels[1:], start=1):
            inbound = history[-1 - k]
            assert (inbound[:, valid:] == 0).all() and (w[:, k, valid:] == 0).all(), (name, k)
            assert (inbound[:, :valid].abs().amax((0, 2, 3)) > 0).all() and (w[:, k, :valid] > 0).all(), (name, k)
            masked += block.out_chs - valid
    assert masked > 0  # the stem output is cut to 16 channels by block 1, then padded


def test_scripted_traced_and_checkpointed_forward_match_eager():
    torch.manual_seed(0)
    model = timm.create_model('densemobilenetv2_n4', num_classes=10).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref, rtol=1e-5, atol=1e-5)
        tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
        fx = create_feature_extractor(
            model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:], tracer_kwargs=tracer_kwargs)
        # eager inference runs the compiled kernels; the traced graph the modules
        torch.testing.assert_close(next(iter(fx(x).values())), ref, rtol=1e-5, atol=1e-6)
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)

    model.train()
    torch.manual_seed(1)
    plain_out = model(x)
    plain_out.sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    torch.manual_seed(1)
    ckpt_out = model(x)  # batch 1 in train mode: the gates' BN falls back to running statistics
    ckpt_out.sum().backward()
    torch.testing.assert_close(ckpt_out, plain_out, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize('size', [33, 97])
def test_features_match_timms_mobilenetv2(size):
    ref = timm.create_model('mobilenetv2_100', features_only=True).eval()
    model = timm.create_model('densemobilenetv2_n2', features_only=True).eval()
    assert model.feature_info.channels() == ref.feature_info.channels()
    assert model.feature_info.reduction() == ref.feature_info.reduction()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        shapes = [f.shape for f in model(x)]
        assert shapes == [f.shape for f in ref(x)]
    picked = timm.create_model('densemobilenetv2_n2', features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        assert [f.shape for f in picked(x)] == [shapes[1], shapes[3]]


def test_output_stride_16_dilates_instead_of_pooling():
    model = timm.create_model('densemobilenetv2_n4', output_stride=16, in_chans=1).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 1, 64, 64), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 4]


def test_dense_n_must_be_positive():
    with pytest.raises(ValueError, match='dense_n must be at least 1'):
        timm.create_model('densemobilenetv2_n4', dense_n=0)
