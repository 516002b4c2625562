"""The timm model contract, for the plugin's models.

The registry and cfg checks run over every model found in timm's registry with an entrypoint in
``timm_denseres``; the behaviour checks over each family's tiny ``test_*`` model, one full-size model per family
and a plain baseline (``CONTRACT_MODELS``), since every model of a family runs the same code. The checks follow the ideas of timm's own tests/test_models.py
(config, head, features, intermediates, TorchScript, FX) plus the rest of timm's model API.

Speed: a model is built once per worker (``_base``) with randomized BatchNorm affine parameters and statistics
(so that the zero-initialised last BN of each branch does not make branches vanish and comparisons trivial);
tests that change a model work on a deep copy. Inputs are small (64 px for ImageNet models, 32 px for CIFAR).
"""
import copy
import functools
import sys
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import group_parameters

from helpers import (
    make_input, model_family, num_params, odd_sizes, plugin_model_names, randomise, reduced, small_size)
from timm_denseres.gate import GateBatchNorm

ALL_MODELS = plugin_model_names()
MODELS = ['test_denseresnet', 'test_densemobilenetv2', 'resnet20', 'denseresnet34_n6', 'densemobilenetv2_n4']
FAMILIES = sorted({model_family(n) for n in ALL_MODELS})

BATCH = 2


@functools.lru_cache(maxsize=None)
def _base(name: str) -> nn.Module:
    """One model per name and worker, in eval mode. Read only: tests that change a model use ``_fresh``."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    return randomise(model, seed=1).eval()


def _fresh(name: str) -> nn.Module:
    return copy.deepcopy(_base(name))


def _with_base_weights(name: str, model: nn.Module) -> nn.Module:
    """A model built with other arguments, given the weights of ``_base(name)``."""
    model.load_state_dict(_base(name).state_dict())
    return model


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    """Eval outputs of ``_base(name)`` at the small size: (input, forward, forward_features, intermediates)."""
    model = _base(name)
    x = make_input(BATCH, small_size(name))
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        _, inter = model.forward_intermediates(x)
    return x, out, feats, inter


def _feature_info(model: nn.Module) -> List[Dict]:
    return list(model.feature_info)


def _close(a: torch.Tensor, b: torch.Tensor, **kw) -> None:
    torch.testing.assert_close(a, b, **kw)


def test_registry_lists_the_plugin_models():
    """The parametrization comes from the registry: it must not be empty, and each model must have its cfg in
    its module's ``default_cfgs`` (else timm's pretrained/data-config machinery has nothing to work with)."""
    assert set(MODELS) <= set(ALL_MODELS)
    assert FAMILIES == ['timm_denseres.densemobilenet', 'timm_denseres.denseresnet']
    for name in ALL_MODELS:
        assert name in sys.modules[model_family(name)].default_cfgs, name
        assert timm.models.get_pretrained_cfg(name) is not None, name


# ---------------------------------------------------------------------------------------------------------------
# pretrained_cfg


@pytest.mark.parametrize('name', ALL_MODELS)
def test_pretrained_cfg_fields(name):
    model = _base(name)
    cfgs = timm.models.get_arch_pretrained_cfgs(name)
    assert cfgs, name
    for tag_name, cfg in cfgs.items():
        c = cfg.to_dict()
        chans, h, w = c['input_size']
        assert chans in (1, 3) and h == w and h > 0, tag_name
        assert len(c['pool_size']) == 2 and all(p > 0 for p in c['pool_size'])
        assert 0 < c['crop_pct'] <= 1.0
        assert c['interpolation'] in ('bilinear', 'bicubic', 'nearest')
        for key in ('mean', 'std'):
            assert len(c[key]) == chans and all(0 < v < 1 for v in c[key]), (tag_name, key)
        assert c['num_classes'] > 0
        assert isinstance(c['license'], str) and c['license'], tag_name
        assert c['paper_ids'], tag_name
        assert c['first_conv'] and c['classifier']

    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes']
    # first_conv and classifier name real modules with the right shapes
    first = model.get_submodule(cfg['first_conv'])
    assert isinstance(first, nn.Conv2d) and first.in_channels == cfg['input_size'][0]
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert classifier.weight.shape == (cfg['num_classes'], model.num_features)
    state = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state and cfg['classifier'] + '.weight' in state


@pytest.mark.parametrize('name', ALL_MODELS)
def test_pool_size_and_data_config(name):
    """For every tag: the model built from the tag's cfg has its classes and input channels, forward_features at
    the cfg's input size has the cfg's pool_size (timm's check), and the resolved data config and its eval
    transform produce that input size."""
    from PIL import Image

    for tag_name in timm.models.get_arch_pretrained_cfgs(name):
        model = _base(name) if tag_name == name else timm.create_model(tag_name).eval()
        cfg = model.pretrained_cfg
        chans, size, _ = cfg['input_size']
        assert model.num_classes == cfg['num_classes'], tag_name
        assert model.get_submodule(cfg['first_conv']).in_channels == chans, tag_name
        with torch.no_grad():
            feats = model.forward_features(make_input(1, size, in_chans=chans))
        assert tuple(feats.shape[1:]) == (model.num_features, *cfg['pool_size']), tag_name

        data_cfg = timm.data.resolve_model_data_config(model)
        for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct'):
            assert data_cfg[key] == cfg[key], (tag_name, key)
        transform = timm.data.create_transform(**data_cfg)
        image = Image.new('L' if chans == 1 else 'RGB', (size * 2 + 3, size + 5))
        assert tuple(transform(image).shape) == tuple(cfg['input_size']), tag_name


# ---------------------------------------------------------------------------------------------------------------
# forward_features / forward_head / classifier


@pytest.mark.parametrize('name', MODELS)
def test_forward_features_and_head(name):
    model = _base(name)
    x, out, feats, _ = _reference(name)
    size = small_size(name)
    last_reduction = _feature_info(model)[-1]['reduction']
    assert model.num_features > 0 and model.head_hidden_size > 0
    assert feats.shape == (BATCH, model.num_features, reduced(size, last_reduction), reduced(size, last_reduction))
    with torch.no_grad():
        pre = model.forward_head(feats, pre_logits=True)
        head = model.forward_head(feats)
    assert pre.shape == (BATCH, model.head_hidden_size)
    assert out.shape == (BATCH, model.num_classes)
    assert torch.isfinite(out).all()
    # the head is average pooling (pre_logits) and the classifier, computed here on their own
    _close(pre, feats.mean((2, 3)), rtol=1e-5, atol=1e-6)
    classifier = model.get_classifier()
    _close(head, torch.nn.functional.linear(pre, classifier.weight, classifier.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier(name):
    model = _fresh(name)
    x, out, feats, _ = _reference(name)
    with torch.no_grad():
        pre = model.forward_head(feats, pre_logits=True)

        model.reset_classifier(0)
        assert model.num_classes == 0
        assert isinstance(model.get_classifier(), nn.Identity)
        pooled = model(x)
        assert pooled.shape == (BATCH, model.num_features) == pre.shape
        _close(pooled, pre)

        model.reset_classifier(7)
        assert model.num_classes == 7
        assert model.get_classifier().weight.shape == (7, model.num_features)
        assert model(x).shape == (BATCH, 7)
        assert model.get_classifier() is model.get_submodule(model.pretrained_cfg['classifier'])

        model.reset_classifier(5, global_pool='max')
        _close(model.forward_head(feats, pre_logits=True), feats.amax((2, 3)))

        # no pooling and no classifier: forward gives the unpooled feature map
        model.reset_classifier(0, global_pool='')
        _close(model(x), feats)

        # global_pool=None keeps the pooling; the new head follows the model's dtype and mode
        model.reset_classifier(3, global_pool='max')
        model.double().train()
        model.reset_classifier(4)
        _close(model.forward_head(feats.double(), pre_logits=True), feats.double().amax((2, 3)))
        assert model.get_classifier().weight.dtype == torch.float64
        assert all(m.training for m in model.modules())


@pytest.mark.parametrize('name', MODELS)
def test_create_with_other_heads(name):
    x, _, feats, _ = _reference(name)
    with torch.no_grad():
        model = timm.create_model(name, num_classes=0, global_pool='').eval()
        missing, _ = model.load_state_dict(_base(name).state_dict(), strict=False)
        assert not missing
        _close(model(x), feats)
        model = timm.create_model(name, num_classes=10).eval()
        assert model.num_classes == 10 and model(x).shape == (BATCH, 10)


# ---------------------------------------------------------------------------------------------------------------
# features_only / forward_intermediates


def _check_feature_shapes(feature_info, outputs, size, batch=BATCH):
    assert len(outputs) == len(feature_info.channels())
    for chans, red, o in zip(feature_info.channels(), feature_info.reduction(), outputs):
        assert o.shape == (batch, chans, reduced(size, red), reduced(size, red)), (chans, red, o.shape)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates(name):
    model = _base(name)
    x, _, feats, inter = _reference(name)
    info = timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info)))
    assert len(info.channels()) >= 3
    _check_feature_shapes(info, inter, small_size(name))
    n = len(inter)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        _close(final, feats)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, n - 2], intermediates_only=True)
        negative = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert len(last2) == 2 and len(picked) == 2 and len(negative) == 1
    for got, want in zip(last2 + picked + negative, inter[-2:] + [inter[0], inter[n - 2]] + inter[-1:]):
        _close(got, want)
    with pytest.raises(Exception):
        model.forward_intermediates(x, indices=n + 1)


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_stop_early(name):
    """stop_early gives the same intermediates and really skips the later layers."""
    model = _base(name)
    x, _, _, inter = _reference(name)
    calls = []
    hooks = [m.register_forward_hook(lambda *_, n=n: calls.append(n))
             for n, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.forward_intermediates(x, indices=[1])
            full_calls = list(calls)
            calls.clear()
            early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
            early_calls = list(calls)
    finally:
        for h in hooks:
            h.remove()
    assert len(early) == 1
    _close(early[0], inter[1])
    last_feature = _feature_info(model)[-1]['module']
    assert last_feature in full_calls and last_feature not in early_calls and len(early_calls) < len(full_calls)


@pytest.mark.parametrize('name,feature_cls', [(n, cls) for cls in ('getter', 'hook') for n in MODELS])
def test_features_only(name, feature_cls):
    """features_only: the default FeatureGetterNet (over forward_intermediates) and timm's forward-hook wrapper
    (whose hooks sit on the feature_info modules): feature_info matches the outputs, and the features equal
    forward_intermediates with the same weights. The getter prunes the head, and nothing a feature needs."""
    x, _, _, inter = _reference(name)
    feat = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    inner = feat.model if feature_cls == 'getter' else feat.body
    missing, unexpected = inner.load_state_dict(_base(name).state_dict(), strict=False)
    assert not missing
    classifier = _base(name).pretrained_cfg['classifier']
    assert classifier + '.weight' in unexpected
    feature_modules = [f['module'] + '.' for f in _feature_info(_base(name))]
    assert not [k for k in unexpected if any(k.startswith(m) for m in feature_modules)]
    with torch.no_grad():
        outs = feat(x)
    _check_feature_shapes(feat.feature_info, outs, small_size(name))
    for got, want in zip(outs, inter):
        _close(got, want)


@pytest.mark.parametrize('name', MODELS)
def test_features_only_out_indices(name):
    x, _, _, inter = _reference(name)
    n = len(inter)
    feat = timm.create_model(name, features_only=True, out_indices=(1, -1)).eval()
    feat.model.load_state_dict(_base(name).state_dict(), strict=False)
    full_info = timm.models.FeatureInfo(_base(name).feature_info, range(n))
    assert feat.feature_info.channels() == [full_info.channels()[1], full_info.channels()[-1]]
    assert feat.feature_info.reduction() == [full_info.reduction()[1], full_info.reduction()[-1]]
    with torch.no_grad():
        outs = feat(x)
    _check_feature_shapes(feat.feature_info, outs, small_size(name))
    _close(outs[0], inter[1])
    _close(outs[1], inter[-1])

    # the layers after the last wanted feature are pruned away
    shallow = timm.create_model(name, features_only=True, out_indices=(0, 1)).eval()
    assert num_params(shallow) < num_params(feat)
    shallow.model.load_state_dict(_base(name).state_dict(), strict=False)
    with torch.no_grad():
        outs = shallow(x)
    _close(outs[1], inter[1])


# ---------------------------------------------------------------------------------------------------------------
# training API: grad checkpointing, param groups, dropout


def _train_step(model: nn.Module, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_same_outputs_and_grads(name):
    """Train mode (BN batch stats) with drop-path on: checkpointing replays the RNG, so outputs and every gradient
    must equal the plain run."""
    torch.manual_seed(0)
    plain = _with_base_weights(name, timm.create_model(name, drop_path_rate=0.2)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = make_input(BATCH, small_size(name))
    out_plain, grads_plain = _train_step(plain, x)
    out_ckpt, grads_ckpt = _train_step(ckpt, x)
    _close(out_ckpt, out_plain)
    assert grads_plain.keys() == grads_ckpt.keys() == {n for n, _ in plain.named_parameters()}
    for n in grads_plain:
        _close(grads_ckpt[n], grads_plain[n], msg=n)
    # re-running blocks in backward must not update the BN statistics a second time
    for (n, b_ckpt), (_, b_plain) in zip(ckpt.named_buffers(), plain.named_buffers()):
        _close(b_ckpt, b_plain, msg=n)

    ckpt.eval()
    plain.eval()
    with torch.no_grad():
        _close(ckpt(x), plain(x))
        _close(ckpt.forward_intermediates(x)[0], plain.forward_features(x))
    ckpt.set_grad_checkpointing(False)
    assert not any(getattr(m, 'grad_checkpointing', False) for m in ckpt.modules())


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_saves_activations(name):
    """Checkpointing must actually hold fewer activations for backward: count what autograd saves."""
    x = make_input(BATCH, small_size(name))

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return total[0]

    model = _fresh(name).train()
    plain = saved_bytes(model)
    model.set_grad_checkpointing(True)
    assert saved_bytes(model) < plain / 2


@pytest.mark.parametrize('name', MODELS)
def test_group_matcher(name):
    model = _base(name)
    names = [n for n, _ in model.named_parameters()]
    groups = {}
    for coarse in (True, False):
        grouping = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        assert set(grouping) == set(names), 'some parameters are in no group'
        ids = [grouping[n] for n in names]
        # groups follow depth (needed by layer-wise lr decay): ids never go down along the parameters
        assert ids == sorted(ids)
        cfg = model.pretrained_cfg
        assert grouping[cfg['first_conv'] + '.weight'] == 0
        assert grouping[cfg['classifier'] + '.weight'] == max(ids)
        groups[coarse] = len(set(ids))
    num_stages = len(model.feature_info) - 1
    assert groups[True] >= num_stages + 2  # stem, stages, head
    assert groups[False] > groups[True]


@pytest.mark.parametrize('name', MODELS)
def test_drop_rate_and_drop_path_rate(name):
    """Both only act in train mode: in eval the outputs equal the model without them; in train mode two runs
    with different seeds differ, while without them train mode is deterministic."""
    x = make_input(BATCH, small_size(name))
    _, ref, _, _ = _reference(name)
    plain = _fresh(name).train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = plain(x)
        torch.manual_seed(2)
        _close(plain(x), a)
    for kwargs in (dict(drop_rate=0.5), dict(drop_path_rate=0.5)):
        model = _with_base_weights(name, timm.create_model(name, **kwargs))
        with torch.no_grad():
            _close(model.eval()(x), ref, msg=str(kwargs))
            model.train()
            torch.manual_seed(1)
            a = model(x)
            torch.manual_seed(2)
            b = model(x)
        assert not torch.allclose(a, b), f'{kwargs} has no effect in train mode'


# ---------------------------------------------------------------------------------------------------------------
# creation variants


@pytest.mark.parametrize('in_chans', [1, 4])
@pytest.mark.parametrize('name', MODELS)
def test_in_chans(name, in_chans):
    model = timm.create_model(name, in_chans=in_chans).eval()
    first = model.get_submodule(model.pretrained_cfg['first_conv'])
    assert first.in_channels == in_chans
    size = small_size(name)
    with torch.no_grad():
        out = model(make_input(BATCH, size, in_chans=in_chans))
        assert out.shape == (BATCH, model.num_classes) and torch.isfinite(out).all()
        with pytest.raises(RuntimeError):
            model(make_input(BATCH, size, in_chans=3))
    assert num_params(model) - num_params(_base(name)) == first.weight[:, :1].numel() * (in_chans - 3)


@pytest.mark.parametrize('name', MODELS)
def test_meta_device(name):
    """Creation under ``torch.device('meta')`` allocates nothing (every tensor is meta) and has the right size;
    a meta forward gives the right output shape."""
    with torch.device('meta'):
        model = timm.create_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert num_params(model) == num_params(_base(name))
    out = model.eval()(torch.empty(BATCH, 3, small_size(name), small_size(name), device='meta'))
    assert out.shape == (BATCH, model.num_classes) and out.is_meta

    model.to_empty(device='cpu')
    model.load_state_dict(_base(name).state_dict())
    _, ref, _, _ = _reference(name)
    with torch.no_grad():
        _close(model(make_input(BATCH, small_size(name))), ref)


@pytest.mark.parametrize('name', MODELS)
def test_channels_last(name):
    model = _fresh(name).to(memory_format=torch.channels_last)
    x, ref, _, _ = _reference(name)
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last))
    _close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# odd inputs


@pytest.mark.parametrize('name', MODELS)
def test_odd_input_sizes(name):
    """Sizes that are not multiples of the reduction: every feature map rounds up (the pooled history must then
    match each block's output), in eval and in a train step where every parameter gets a finite gradient."""
    model = _base(name)
    info = timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info)))
    for size in odd_sizes(name):
        with torch.no_grad():
            out, inter = model.forward_intermediates(make_input(1, size))
        _check_feature_shapes(info, inter, size, batch=1)
        assert torch.isfinite(out).all()

    model = _fresh(name).train()
    size = min(odd_sizes(name))
    out, grads = _train_step(model, make_input(BATCH, size))
    assert out.shape == (BATCH, model.num_classes)
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())


def _split_norms(model: nn.Module):
    gate = {n: m for n, m in model.named_modules() if isinstance(m, GateBatchNorm)}
    main = {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in gate}
    return gate, main


@pytest.mark.parametrize('name', MODELS)
def test_batch_of_one_trains(name):
    """Batch size 1 in train mode: forward and backward work; the gate BN (one value per channel) keeps its
    running statistics, every other BN updates them."""
    model = _fresh(name).train()
    gate, main = _split_norms(model)
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
              for n, m in {**gate, **main}.items()}
    out, grads = _train_step(model, make_input(1, small_size(name)))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    for n, m in gate.items():
        mean, var, count = before[n]
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var), n
        assert int(m.num_batches_tracked) == count, n
    for n, m in main.items():
        mean, var, count = before[n]
        assert not torch.equal(m.running_mean, mean) and not torch.equal(m.running_var, var), n
        assert int(m.num_batches_tracked) == count + 1, n


@pytest.mark.parametrize('name', MODELS)
def test_input_too_small_for_batch_stats(name):
    """An input that leaves a single pixel in the last stage cannot be trained with a batch of one (BatchNorm
    needs more than one value per channel): that must be a clear error, and eval mode must still work."""
    model = _fresh(name)
    size = _feature_info(model)[-1]['reduction']
    x = make_input(1, size)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        model.train()(x)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript, torch.fx, torch.compile


@pytest.mark.slow
@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = _with_base_weights(name, timm.create_model(name)).eval()
    scripted = torch.jit.script(model)
    x, ref, _, _ = _reference(name)
    with torch.no_grad():
        _close(scripted(x), ref)


@pytest.mark.slow
@pytest.mark.parametrize('name', MODELS)
def test_fx_feature_extraction(name):
    """torch.fx with timm's leaf modules: the graph covers the whole network (every conv is a node); the traced
    model equals eager in eval and in train mode, where it back-propagates to every parameter; timm's fx
    features_only (FeatureGraphNet) equals forward_intermediates. Every trace of a 54-block model costs seconds,
    so the node names come from the cfg's classifier instead of an extra get_graph_node_names trace."""
    model = _fresh(name)
    x, ref, _, inter = _reference(name)
    classifier = model.pretrained_cfg['classifier']
    fx_model = timm.models.create_feature_extractor(model, [classifier]).eval()
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for graph in (fx_model.eval_graph, fx_model.train_graph):
        assert convs <= {n.target for n in graph.nodes if n.op == 'call_module'}
        assert list(graph.nodes)[-2].target == classifier  # the node just before the output
    with torch.no_grad():  # eager inference folds each gate's BatchNorm into fc1; the graph calls the modules
        _close(fx_model(x)[classifier], ref, rtol=1e-5, atol=1e-6)

    twin = copy.deepcopy(model).train()
    fx_model.train()
    out = fx_model(x)[classifier]
    out.sum().backward()
    # eager training sums in the compiled kernel (timm_denseres/_kernels.py), the graph with PyTorch operations: 1e-7
    # apart per block, a few 1e-5 after training-mode BatchNorm over 17-54 blocks
    _close(out, twin(x), rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in fx_model.parameters())

    feat = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    missing, _ = feat.graph_module.load_state_dict(_base(name).state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        outs = feat(x)
    _check_feature_shapes(feat.feature_info, outs, small_size(name))
    for got, want in zip(outs, inter):
        _close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize('name', MODELS)
def test_torch_compile_dynamo(name):
    """Every model is captured by dynamo as ONE graph (fullgraph=True: a graph break, which would silently run
    part of the model in eager, is an error) and the captured graph gives eager's output. backend='eager' runs
    the captured graph as is: on a 2-core CPU, AOT autograd would add about 10 s per 54-block model and
    inductor about a minute, so those run once (test_torch_compile_inductor, which includes AOT)."""
    _compile_and_compare(name, 'eager', small_size(name))


def _compile_and_compare(name: str, backend: str, size: int) -> None:
    torch._dynamo.reset()  # a fresh cache per model, so no model hits dynamo's recompile limit and falls back
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    model = _base(name)
    x = make_input(BATCH, size)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=counting_backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert len(graphs) == 1
    _close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor():
    """The full default path (dynamo, AOT autograd, inductor code generation) once, on the smallest gated model:
    both families build their dense blocks from the same gate and history code (gate.py, _dense.py), and compile
    time grows with the graph (20-30 s per tiny model on a 2-core CPU). Dynamo alone runs on each model of MODELS."""
    _compile_and_compare('test_denseresnet', 'inductor', small_size('test_denseresnet'))
