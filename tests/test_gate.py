"""The Gate-Module and whole dense networks against the paper's formula, written out plainly below (the reference:
one operation per line, no caching, no in-place work). Every way a gate runs is compared with it: the compiled
kernels, the gate's modules (a forward hook makes the gate use them), TorchScript, torch.fx, torch.compile."""
import copy
from typing import List, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_denseres  # noqa: F401  registers the models
from helpers import fx_feature_model, make_gate, randomise, reference_adjust, zero_branches
from timm_denseres._dense import History, avg_pool_2x2, pad_channels
from timm_denseres.gate import GateBatchNorm, gate_hidden_channels
from timm_denseres.gate_stats import gate_modules, record_gates

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the reference


def reference_weights(gate, y: torch.Tensor, inbounds: List[torch.Tensor]):
    """(v, w) from the pooled vectors, as the paper states it. The gate BatchNorm updates ``gate.bn``'s running
    statistics as a BatchNorm does (and not for a single sample, which it normalises with them instead)."""
    n, channels = gate.num_inbounds, gate.channels
    g = torch.cat([y.mean((2, 3))] + [a.mean((2, 3)) for a in inbounds], dim=1)[:, :, None, None]
    h = F.conv2d(g, gate.fc1.weight)
    batch_stats = gate.bn.training and h.shape[0] > 1
    if batch_stats:
        gate.bn.num_batches_tracked += 1
    h = F.batch_norm(h, gate.bn.running_mean, gate.bn.running_var, gate.bn.weight, gate.bn.bias,
                     batch_stats, gate.bn.momentum, gate.bn.eps)
    logits = F.conv2d(F.relu(h), gate.fc2.weight, gate.fc2.bias).reshape(-1, n + 1, channels) * gate.logit_scale
    v = torch.sigmoid(logits[:, 0])
    padded = torch.zeros(n, channels, dtype=torch.bool, device=y.device)
    for k, valid in enumerate(gate.weights.valid_channels):
        padded[k, valid:] = True  # channels that zero-padding created: out of the softmax
    w = torch.softmax(logits[:, 1:].masked_fill(padded, float('-inf')), dim=1)
    return v, w


def reference_gate(gate, y: torch.Tensor, inbounds: List[torch.Tensor]):
    """``out = act(v * y + sum_k w_k * a_k)`` with zero-padded inbounds; returns (out, v, w)."""
    v, w = reference_weights(gate, y, inbounds)
    out = v[:, :, None, None] * y
    for k, a in enumerate(inbounds):
        out = out + w[:, k, :, None, None] * a
    if isinstance(gate.out_act, nn.ReLU):
        out = F.relu(out)
    return out, v, w


def reference_denseresnet(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DenseResNet's forward from the paper: block i mixes its branch, its shortcut and the outputs x_{i-2}..x_{i-n}
    (pooled and zero-padded to the block's shape), then applies ReLU. Only timm's branch and shortcut layers are
    reused."""
    outputs = [model.maxpool(model.forward_stem(x))]
    for block in model.dense_blocks():
        inp = outputs[-1]
        y = block.branch(inp)
        shortcut = inp if block.downsample is None else block.downsample(inp)
        if block.changes_shape:
            outputs = [reference_adjust(h, block.out_chs, block.pool) for h in outputs]
        inbounds = [shortcut] + [outputs[-k] for k in range(2, block.num_inbounds + 1)]
        outputs = (outputs + [reference_gate(block.gate, y, inbounds)[0]])[-model.dense_n:]
    return model.forward_head(outputs[-1])


def reference_densemobilenetv2(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DenseMobileNetV2's forward from the paper: block i mixes its branch with x_{i-1}..x_{i-n}, all brought to
    the block's shape (pooled, zero-padded or cut), with no activation after the mix."""
    outputs = [model.bn1(model.conv_stem(x))]
    for block in model.dense_blocks():
        y = block.branch(outputs[-1])
        if block.changes_shape:
            outputs = [reference_adjust(h, block.out_chs, block.pool) for h in outputs]
        inbounds = [outputs[-k] for k in range(1, block.num_inbounds + 1)]
        outputs = (outputs + [reference_gate(block.gate, y, inbounds)[0]])[-model.dense_n:]
    return model.forward_head(model.bn2(model.conv_head(outputs[-1])))


REFERENCES = {'test_denseresnet': reference_denseresnet, 'denseresnet110_n4': reference_denseresnet,
              'denseresnet34_n6': reference_denseresnet, 'test_densemobilenetv2': reference_densemobilenetv2,
              'densemobilenetv2_n4': reference_densemobilenetv2}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def assert_grads_close(model: nn.Module, ref: nn.Module) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=name)


def assert_buffers_close(model: nn.Module, ref: nn.Module) -> None:
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)


def gate_inputs(batch: int, channels: int, valid: List[int], size: Tuple[int, int], seed: int,
                channels_last: bool = False) -> List[torch.Tensor]:
    """y and one inbound per entry of ``valid``, zero past its valid channels (as the history pads them)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, channels, *size, generator=gen)
    inbounds = []
    for c in valid:
        a = torch.randn(batch, channels, *size, generator=gen)
        a[:, c:] = 0
        inbounds.append(a)
    if channels_last:
        y, inbounds = y.to(memory_format=torch.channels_last), [a.to(memory_format=torch.channels_last)
                                                                for a in inbounds]
    return [t.requires_grad_() for t in [y] + inbounds]


def run_gate(gate, y: torch.Tensor, inbounds: List[torch.Tensor]) -> torch.Tensor:
    """The gate as a block calls it: the inbounds' means beside them (zero-padded to y's width)."""
    means = [pad_channels(a.mean((2, 3)), y.shape[1]) for a in inbounds]
    out, out_mean = gate(y, inbounds, means, y)
    torch.testing.assert_close(out_mean, out.mean((2, 3)), **TOL)
    return out


def step(forward, x: torch.Tensor):
    """Output and input gradient of one forward and backward with a fixed random output gradient."""
    x = x.clone().requires_grad_()
    out = forward(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype))
    return out, x.grad


# ---------------------------------------------------------------------------------------------------------------
# the gate alone


GATE_CASES = [
    # channels, valid channels per inbound (shortcut first), spatial size, reduction
    (16, [16], (8, 8), 2),
    (16, [16, 16], (7, 5), 2),
    (32, [32, 16, 16, 32], (9, 9), 2),  # masked: two inbounds zero-padded from 16 channels
    (24, [24, 16, 24, 8, 8, 24, 24], (5, 3), 4),  # N = 7, two padding widths
    (64, [64, 64, 32, 32, 32, 16], (1, 1), 8),  # a 1x1 map (the last stage of a small input)
    (48, [48, 48, 24], (4, 4), 2),  # a hidden width (24) that is no power of two, as in DenseMobileNetV2
]


@pytest.mark.parametrize('channels,valid,size,reduction', GATE_CASES)
@pytest.mark.parametrize('training,batch', [(True, 3), (False, 3), (True, 1)])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('hooked', [False, True], ids=['kernels', 'modules'])
@pytest.mark.parametrize('narrow', [False, True], ids=['padded', 'narrow'])
@pytest.mark.parametrize('relu', [True, False], ids=['relu', 'no-act'])
def test_gate_matches_reference(channels, valid, size, reduction, training, batch, channels_last, hooked, narrow,
                                relu):
    """Both paths of the gate: the kernels (no hooks, CPU float32) and the modules (a forward hook on
    ``gate.weights``, as ``record_gates`` registers). ``narrow``: the zero-padded inbounds are given without their
    padding (as the models keep their history)."""
    gate = make_gate(channels, valid, reduction, seed=channels + len(valid), relu=relu).train(training)
    ref = copy.deepcopy(gate)
    seen = []
    if hooked:
        gate.weights.register_forward_hook(lambda m, i, o: seen.append(o))
    ref_inputs = gate_inputs(batch, channels, valid, size, seed=len(valid), channels_last=channels_last)
    inputs = [t.detach().clone().requires_grad_() for t in ref_inputs]
    if narrow:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        inputs[1:] = [a.detach()[:, :c].contiguous(memory_format=memory_format).requires_grad_()
                      for a, c in zip(ref_inputs[1:], valid)]
    before = [t.detach().clone() for t in inputs]

    out = run_gate(gate, inputs[0], inputs[1:])
    ref_out, ref_v, ref_w = reference_gate(ref, ref_inputs[0], ref_inputs[1:])
    torch.testing.assert_close(out, ref_out, **TOL)
    if hooked:
        (v, w), = seen  # the hook sees (v (B, C), w (B, n, C))
        torch.testing.assert_close(v, ref_v, **TOL)
        torch.testing.assert_close(w, ref_w, **TOL)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref_out.backward(grad)
    for k, (t, r) in enumerate(zip(inputs, ref_inputs)):
        torch.testing.assert_close(t.grad, r.grad[:, :t.shape[1]], **TOL, msg=lambda m, k=k: f"input {k}: {m}")
    assert_grads_close(gate, ref)
    assert_buffers_close(gate, ref)
    for t, b in zip(inputs, before):  # nothing writes into an input that autograd records
        assert torch.equal(t.detach(), b)


def test_partial_gradients():
    """Only some inputs need a gradient (frozen gate, detached inbound): the others get none, the rest match."""
    gate = make_gate(16, [16, 8, 16], 2, seed=3).train()
    for p in gate.parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(gate)
    y, a1, a2, a3 = gate_inputs(3, 16, [16, 8, 16], (5, 5), seed=3)
    a2 = a2.detach()
    ry, ra1, ra3 = (t.detach().clone().requires_grad_() for t in (y, a1, a3))
    run_gate(gate, y, [a1, a2, a3]).square().sum().backward()
    reference_gate(ref, ry, [ra1, a2.clone(), ra3])[0].square().sum().backward()
    for t, r in ((y, ry), (a1, ra1), (a3, ra3)):
        torch.testing.assert_close(t.grad, r.grad, **TOL)
    assert a2.grad is None


def test_autocast_bfloat16_matches_reference():
    """Under CPU autocast the gate's dtypes mix (bf16 maps, fp32 softmax); the gate promotes as the formula."""
    gate = make_gate(16, [16, 8], 2, seed=5).eval()
    y, a1, a2 = (t.detach().bfloat16() for t in gate_inputs(2, 16, [16, 8], (4, 4), seed=5))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = run_gate(gate, y, [a1, a2])
        ref = reference_gate(gate, y, [a1, a2])[0]
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('channels,reduction,hidden', [(64, 8, 8), (512, 8, 64), (16, 2, 8), (24, 4, 8), (320, 4, 80),
                                                       (3, 8, 8)])
def test_gate_hidden_width_rule(channels, reduction, hidden):
    assert gate_hidden_channels(channels, reduction) == hidden


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


@pytest.mark.parametrize('hooked', [False, True], ids=['kernels', 'modules'])
def test_gate_batchnorm_without_momentum_keeps_a_cumulative_average(hooked):
    """``momentum=None``: the running statistics are the average over all batches so far, as PyTorch's
    BatchNorm keeps them; in the gate's kernels as in its modules."""
    gate = make_gate(8, [8, 8], 2, seed=0).train()
    gate.bn.momentum = None
    gate.bn.reset_running_stats()
    torch_bn = nn.BatchNorm1d(gate.bn.num_features, momentum=None).train()
    if hooked:
        gate.weights.register_forward_hook(lambda *_: None)
    for seed in range(3):
        y, a1, a2 = gate_inputs(4, 8, [8, 8], (3, 3), seed=seed)
        with torch.no_grad():
            g = torch.cat([t.mean((2, 3)) for t in (y, a1, a2)], 1)
            torch_bn(F.linear(g, gate.fc1.weight.flatten(1)))
            run_gate(gate, y, [a1, a2])  # (without autograd the kernel may write the block output into y)
    assert int(gate.bn.num_batches_tracked) == 3
    torch.testing.assert_close(gate.bn.running_mean, torch_bn.running_mean, **TOL)
    torch.testing.assert_close(gate.bn.running_var, torch_bn.running_var, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# whole networks against the reference, in float64: float32 rounding grows through 50 random blocks to ~1e-4,
# float64 stays far below 1e-5, while a wrong formula would still show


@pytest.mark.parametrize('name,size', [('test_denseresnet', 33), ('denseresnet110_n4', 27),
                                       ('test_densemobilenetv2', 65)])
@pytest.mark.parametrize('training', [True, False])
def test_network_matches_reference_forward_and_backward(name, size, training):
    torch.manual_seed(0)
    model = timm.create_model(name).double()
    randomise(model, seed=size)
    model.train(training)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    out, x_grad = step(model, x)
    ref_out, ref_x_grad = step(lambda t: REFERENCES[name](ref, t), x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-5 * max(ref_x_grad.abs().max().item(), 1.0))
    assert_grads_close(model, ref)
    assert_buffers_close(model, ref)


def test_history_carries_each_output_and_its_mean():
    """A dense block passes on at most N outputs and their means; the earlier outputs pass as they were."""
    model = timm.create_model('denseresnet110_n4').eval()
    x0 = torch.randn(2, 16, 8, 8)
    history = History([x0], [x0.mean((2, 3))])
    with torch.no_grad():
        for i, block in enumerate(list(model.layer1)[:5], start=1):
            out = block(history)
            kept = min(i + 1, 4)
            assert len(out.outputs) == len(out.means) == kept
            assert all(a is b for a, b in zip(out.outputs[:-1], history.outputs[-(kept - 1):]))
            for mean, x in zip(out.means, out.outputs):
                torch.testing.assert_close(mean, x.mean((2, 3)), **TOL)
            history = out


@pytest.mark.parametrize('name,size', [('denseresnet110_n4', 32), ('test_denseresnet', 27), ('denseresnet34_n6', 64),
                                       ('test_densemobilenetv2', 64)])
def test_mixing_weights_sum_to_one_and_padding_is_masked(name, size):
    model = timm.create_model(name).eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, b=b: seen.__setitem__(b, out))
             for b, m in gate_modules(model).items()]
    with torch.no_grad():
        model(torch.randn(3, 3, size, size))
    for h in hooks:
        h.remove()
    assert len(seen) == len(model.dense_blocks())
    for block, (v, w) in seen.items():
        assert ((v > 0) & (v < 1)).all()
        torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]), rtol=0, atol=1e-6)
        gate = model.get_submodule(block).gate
        for k, valid in enumerate(gate.weights.valid_channels):
            assert (w[:, k, valid:] == 0).all(), (block, k)  # zero-padding channels get no weight
            if k > 0 and valid < gate.channels:
                assert (w[:, k, :valid] > 0).all()


@pytest.mark.parametrize('name,size', [('denseresnet110_n4', 32), ('denseresnet34_n8', 65)])
def test_identity_path_survives_with_zero_branches(name, size):
    """Paper eq. 2-5: with every branch at zero the mixing weights sum to one, so every block of the first stage
    passes x_0 on (later, a projection shortcut, which has parameters, changes the identity path of a ResNet).
    In float64, where "sum to one" holds to 1e-15 (in float32 each block's sum is off by an ulp or so)."""
    torch.manual_seed(0)
    model = zero_branches(timm.create_model(name).double().eval())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        stem = model.maxpool(model.forward_stem(x))
        history = History([stem], [stem.mean((2, 3))])
        for block in model.layer1:
            history = block(history)
            torch.testing.assert_close(history.outputs[-1], stem, rtol=1e-12, atol=1e-12)
        stage1 = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(stage1, stem, rtol=1e-12, atol=1e-12)


def test_identity_gates_with_resnet34_weights_give_resnet34_logits():
    torch.manual_seed(0)
    resnet = randomise(timm.create_model('resnet34'), seed=0).eval()
    dense = timm.create_model('denseresnet34_n6').eval()
    missing, unexpected = dense.load_state_dict(resnet.state_dict(), strict=False)
    assert not unexpected
    assert missing and all('.gate.' in k for k in missing)
    dense.set_gates_identity()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref, out = resnet(x), dense(x)
    assert (ref - out).abs().max().item() < 1e-5 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize('scale', [1.0, 10.0])
def test_gate_init_logit_starts_every_gate_at_the_shortcut(scale):
    """fc2 holds the logits divided by the scale: the starting logits, and so v and w, do not depend on it."""
    model = timm.create_model('test_denseresnet', gate_init_logit=3.0, gate_logit_scale=scale)
    x = torch.randn(2, 3, 16, 16)
    with record_gates(model.eval()) as stats, torch.no_grad():
        model(x)
    for block in model.dense_blocks():
        bias = block.gate.fc2.bias.view(-1, block.gate.channels) * scale
        assert torch.all(block.gate.fc2.weight == 0) and torch.allclose(bias[:2], torch.full_like(bias[:2], 3.0))
        assert torch.all(bias[2:] == 0)
    assert all(v == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-6) for v in stats.v_mean().values())


# ---------------------------------------------------------------------------------------------------------------
# the other ways of running a model: the gate's modules and the plain formula


@pytest.mark.parametrize('size', [(8, 8), (7, 9), (2, 3), (1, 1), (56, 56)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_avg_pool_2x2_is_ceil_mode_avg_pool(size, channels_last):
    x = torch.randn(3, 8, *size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = avg_pool_2x2(x)
    ref = F.avg_pool2d(ref_x, kernel_size=2, stride=2, ceil_mode=True)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, **TOL)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast must not cast the pool to bf16
        assert avg_pool_2x2(x).dtype == torch.float32
    with torch.no_grad():  # without autograd the pool takes another way (strided adds)
        torch.testing.assert_close(avg_pool_2x2(x.detach()), ref.detach(), **TOL)


@pytest.mark.parametrize('training', [True, False])
def test_fx_traced_model_matches_eager(training):
    """timm's fx feature extraction keeps the pool as a leaf, and the traced network equals eager, gradients
    included."""
    torch.manual_seed(0)
    model = randomise(timm.create_model('test_denseresnet').double(), seed=1).train(training)
    twin = copy.deepcopy(model)
    traced = fx_feature_model(model).train(training)
    assert avg_pool_2x2 in {n.target for n in traced.graph.nodes if n.op == 'call_function'}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, x_grad = step(lambda t: next(iter(traced(t).values())), x)
    ref_out, ref_x_grad = step(twin, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    assert_grads_close(traced, twin)


@pytest.mark.parametrize('name', ['test_denseresnet', 'test_densemobilenetv2'])
def test_torchscript_trains_like_eager(name):
    torch.manual_seed(0)
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name).double()
    model = randomise(model, seed=2).train()
    twin = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, x_grad = step(scripted, x)
    ref_out, ref_x_grad = step(twin, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    assert_grads_close(scripted, twin)


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """Under torch.compile the gate is the plain formula, for the compiler to fuse: same gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomise(timm.create_model('test_denseresnet').double(), seed=3).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, x_grad = step(compiled, x)
    ref_out, ref_x_grad = step(twin, x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    assert_grads_close(model, twin)


@pytest.mark.parametrize('hooked', [False, True], ids=['kernels', 'modules'])
def test_training_after_inference_mode(hooked):
    """The padding mask that the gate's modules cache is made outside inference mode: a model first run (with
    its modules) under torch.inference_mode then trains, with the kernels and with the modules alike."""
    model = timm.create_model('test_denseresnet')
    x = torch.randn(2, 3, 16, 16)
    masked = [b.gate.weights for b in model.dense_blocks() if b.gate.weights.needs_mask]
    handles = [w.register_forward_hook(lambda *_: None) for w in masked]
    with torch.inference_mode():
        model.eval()(x)
    assert masked and all(w._mask is not None and not w._mask.is_inference() for w in masked)
    if not hooked:
        for h in handles:
            h.remove()
    model.train()(x).sum().backward()
    assert all(b.gate.fc2.weight.grad is not None for b in model.dense_blocks())


def test_model_made_in_inference_mode_runs():
    torch.manual_seed(0)
    ref_model = timm.create_model('test_denseresnet').eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = timm.create_model('test_denseresnet').eval()
        assert next(model.parameters()).is_inference()
        torch.testing.assert_close(model(x), ref_model(x), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# reading the gates


def test_record_gates_means_over_batches():
    model = timm.create_model('test_denseresnet').eval()
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        with record_gates(model) as both:
            model(a)
            model(b)
        with record_gates(model) as joint:
            model(torch.cat([a, b]))
    assert all(not m._forward_hooks for m in model.modules())  # leaving the block removes its hooks
    for i, (block, w) in enumerate(joint.w_mean().items()):
        assert w == pytest.approx(both.w_mean()[block], abs=1e-5)
        assert sum(w) == pytest.approx(1.0, abs=1e-5)
        assert len(w) == min(model.dense_n, i + 1)
    assert both.v_mean() == pytest.approx(joint.v_mean(), abs=1e-5)


def test_record_gates_rejects_a_model_without_gates():
    with pytest.raises(ValueError, match='no DenseResNet gates'):
        with record_gates(timm.create_model('resnet20')):
            pass
