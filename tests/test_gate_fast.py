"""The optimised gate path against a straightforward implementation of the paper's formula (written here, from
../shared/denseresnet.md "One block"), to 1e-5: outputs, (v, w), gradients and BatchNorm statistics, in train and
eval mode, for several N, with zero-padded (masked) inbounds and odd spatial sizes."""
import copy
from typing import List, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_denseres  # noqa: F401  registers the models
from helpers import make_gate, randomise
from timm_denseres.fused import kernel_disabled
from timm_denseres.gate import DenseGate, avg_pool_2x2, weighted_sum_lean_backward

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the reference: the spec, one operation per line, no caching, no in-place work


def reference_weights(gate: DenseGate, y: torch.Tensor, inbounds: List[torch.Tensor]):
    """(v, w) from the pooled vectors, as the spec states it. The gate BatchNorm updates ``gate.bn``'s running
    statistics as a BatchNorm does (and not for a single sample, which it normalises with them instead)."""
    n, channels = gate.num_inbounds, gate.channels
    g = torch.cat([y.mean((2, 3))] + [a.mean((2, 3)) for a in inbounds], dim=1)[:, :, None, None]
    h = F.conv2d(g, gate.fc1.weight)
    batch_stats = gate.bn.training and h.shape[0] > 1
    if batch_stats:
        gate.bn.num_batches_tracked += 1
    h = F.batch_norm(h, gate.bn.running_mean, gate.bn.running_var, gate.bn.weight, gate.bn.bias,
                     batch_stats, gate.bn.momentum, gate.bn.eps)
    logits = F.conv2d(F.relu(h), gate.fc2.weight, gate.fc2.bias).reshape(-1, n + 1, channels)
    v = torch.sigmoid(logits[:, 0])
    padded = torch.zeros(n, channels, dtype=torch.bool, device=y.device)
    for k, valid in enumerate(gate.weights.valid_channels):
        padded[k, valid:] = True  # channels that zero-padding created: out of the softmax
    w = torch.softmax(logits[:, 1:].masked_fill(padded, float('-inf')), dim=1)
    return v, w


def reference_mix(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, inbounds: List[torch.Tensor]) -> torch.Tensor:
    out = v[:, :, None, None] * y
    for k, a in enumerate(inbounds):
        out = out + w[:, k, :, None, None] * a
    return out


def reference_gate(gate: DenseGate, y: torch.Tensor, inbounds: List[torch.Tensor]):
    """``out = v * y + sum_k w_k * a_k``; returns (out, v, w)."""
    v, w = reference_weights(gate, y, inbounds)
    return reference_mix(y, v, w, inbounds), v, w


def reference_adjust(x: torch.Tensor, channels: int, pool: bool) -> torch.Tensor:
    if pool:
        x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    if x.shape[1] < channels:
        x = torch.cat([x, x.new_zeros(x.shape[0], channels - x.shape[1], x.shape[2], x.shape[3])], dim=1)
    return x[:, :channels]


def reference_denseresnet(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DenseResNet's forward from the spec: block i mixes its branch, its shortcut and the outputs x_{i-2}..x_{i-n}
    (pooled and zero-padded to the block's shape), then applies ReLU. Only timm's branch/shortcut are reused."""
    outputs = [model.maxpool(model.forward_stem(x))]
    for block in model._blocks():
        inp = outputs[-1]
        y = block.branch(inp)
        shortcut = inp if block.downsample is None else block.downsample(inp)
        if block.stride != 1 or block.downsample is not None:
            outputs = [reference_adjust(h, block.out_chs, block.stride != 1) for h in outputs]
        inbounds = [shortcut] + [outputs[-k] for k in range(2, block.num_inbounds + 1)]
        out, _, _ = reference_gate(block.gate, y, inbounds)
        outputs = (outputs + [F.relu(out)])[-model.dense_n:]
    return model.forward_head(outputs[-1])


def reference_densemobilenetv2(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DenseMobileNetV2's forward from the spec: block i mixes its branch with x_{i-1}..x_{i-n}, all brought to
    the block's shape (pooled, zero-padded or cut), with no activation after the mix. Only timm's layers and the
    branches are reused."""
    outputs = [model.bn1(model.conv_stem(x))]
    for block in model._dense_blocks():
        y = block.branch(outputs[-1])
        if block.changes_shape:
            outputs = [reference_adjust(h, block.out_chs, block.pool) for h in outputs]
        out, _, _ = reference_gate(block.gate, y, [outputs[-k] for k in range(1, block.num_inbounds + 1)])
        outputs = (outputs + [out])[-model.dense_n:]
    return model.forward_head(model.bn2(model.conv_head(outputs[-1])))


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _assert_grads_close(fast: nn.Module, ref: nn.Module) -> None:
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=name)


def _assert_buffers_equal(fast: nn.Module, ref: nn.Module) -> None:
    for (name, b), (_, c) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)


def _inputs(batch: int, channels: int, valid: List[int], size: Tuple[int, int], seed: int,
            channels_last: bool = False):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, channels, *size, generator=gen)
    inbounds = []
    for c in valid:
        a = torch.randn(batch, channels, *size, generator=gen)
        a[:, c:] = 0  # zero padding, as adjust_inbound makes it
        inbounds.append(a)
    if channels_last:
        y, inbounds = y.to(memory_format=torch.channels_last), [a.to(memory_format=torch.channels_last)
                                                                for a in inbounds]
    return [t.requires_grad_() for t in [y] + inbounds]


# ---------------------------------------------------------------------------------------------------------------
# the gate alone


GATE_CASES = [
    # channels, valid channels per inbound (shortcut first), spatial size, reduction
    (16, [16], (8, 8), 2),
    (16, [16, 16], (7, 5), 2),
    (32, [32, 16, 16, 32], (9, 9), 2),  # masked: two inbounds zero-padded from 16 channels
    (24, [24, 16, 24, 8, 8, 24, 24], (5, 3), 4),  # N = 7, two padding widths
    (64, [64, 64, 32, 32, 32, 16], (1, 1), 8),  # a 1x1 map (the last stage of a small input)
]


@pytest.mark.parametrize('channels,valid,size,reduction', GATE_CASES)
@pytest.mark.parametrize('training,batch', [(True, 3), (False, 3), (True, 1)])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('inspect', [False, True], ids=['fused', 'modules'])
@pytest.mark.parametrize('narrow', [False, True], ids=['padded', 'narrow'])
def test_gate_matches_reference(channels, valid, size, reduction, training, batch, channels_last, inspect, narrow):
    """Both ways the gate's small layers run: fused into one autograd node (no hooks), and as modules (a forward
    hook on ``gate.weights``, as ``record_gates`` registers, makes the gate call its modules). ``narrow``: the
    zero-padded inbounds are given without their padding (as the models keep their history), the reference
    gets them padded."""
    fast = make_gate(channels, valid, reduction, seed=channels + len(valid)).train(training)
    ref = copy.deepcopy(fast)
    seen = []
    if inspect:
        fast.weights.register_forward_hook(lambda m, i, o: seen.append(o))
    ref_inputs = _inputs(batch, channels, valid, size, seed=len(valid), channels_last=channels_last)
    inputs = [t.detach().clone().requires_grad_() for t in ref_inputs]
    if narrow:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        inputs[1:] = [a.detach()[:, :c].contiguous(memory_format=memory_format).requires_grad_()
                      for a, c in zip(ref_inputs[1:], valid)]
    before = [t.detach().clone() for t in inputs]

    out = fast(inputs[0], inputs[1:])
    ref_out, ref_v, ref_w = reference_gate(ref, ref_inputs[0], ref_inputs[1:])
    torch.testing.assert_close(out, ref_out, **TOL)
    if inspect:
        (v, w), = seen  # the inspection hook sees (v (B, C), w (B, n, C))
        assert v.shape == (batch, channels) and w.shape == (batch, len(valid), channels)
        torch.testing.assert_close(v, ref_v, **TOL)
        torch.testing.assert_close(w, ref_w, **TOL)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref_out.backward(grad)
    for k, (t, r) in enumerate(zip(inputs, ref_inputs)):
        torch.testing.assert_close(t.grad, r.grad[:, :t.shape[1]], **TOL, msg=f'input {k}')
    _assert_grads_close(fast, ref)
    _assert_buffers_equal(fast, ref)
    for t, b in zip(inputs, before):  # the in-place accumulation never writes into an input
        assert torch.equal(t.detach(), b)


def test_split_api_and_pooled_api_match_forward():
    """compute_weights + mix and weights_from_pooled (the split API) give forward's result."""
    gate = make_gate(32, [32, 16, 32], 2, seed=0).eval()
    y, *inbounds = _inputs(2, 32, [32, 16, 32], (6, 7), seed=0)
    with torch.no_grad():
        out = gate(y, inbounds)
        v, w = gate.compute_weights(y, inbounds)
        torch.testing.assert_close(gate.mix(y, v, w, inbounds), out, rtol=0, atol=0)
        pooled = [t.mean((2, 3)) for t in [y] + inbounds]
        v2, w2 = gate.weights_from_pooled(pooled)
    torch.testing.assert_close(v2, v, **TOL)
    torch.testing.assert_close(w2, w, **TOL)


@pytest.mark.parametrize('training,batch', [(True, 4), (False, 4), (True, 1)])
@pytest.mark.parametrize('valid', [[16, 16, 16], [16, 8, 16, 4]])
def test_fused_gate_head_equals_the_modules_exactly(training, batch, valid):
    """The one-node gate (_GateHeadFn) runs the modules' own operations: (v, w), every gradient and the BatchNorm
    statistics are bitwise those of the module path, and it is the node autograd records. (With the compiled
    kernel off: where it builds, it takes this node's place; tests/test_fused.py compares it with the modules.)"""
    with kernel_disabled():
        _check_gate_head_equals_the_modules_exactly(training, batch, valid)


def _check_gate_head_equals_the_modules_exactly(training, batch, valid):
    fused = make_gate(16, valid, 2, seed=5).train(training)
    modules = copy.deepcopy(fused)
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(batch, 16, 5, 6, generator=gen, requires_grad=True)
    pooled = [torch.randn(batch, 16, generator=gen, requires_grad=True) for _ in valid]
    y2, pooled2 = y.detach().clone().requires_grad_(), [p.detach().clone().requires_grad_() for p in pooled]

    v, w = fused.weights_for(y, pooled)
    assert type(v.grad_fn).__name__ == '_GateHeadFnBackward'
    modules.weights.register_forward_hook(lambda *_: None)  # a hook: the gate must call its modules
    v2, w2 = modules.weights_for(y2, pooled2)
    assert type(v2.grad_fn).__name__ != '_GateHeadFnBackward'
    assert torch.equal(v, v2) and torch.equal(w, w2)

    grad_v, grad_w = torch.randn(v.shape, generator=gen), torch.randn(w.shape, generator=gen)
    ((v * grad_v).sum() + (w * grad_w).sum()).backward()
    ((v2 * grad_v).sum() + (w2 * grad_w).sum()).backward()
    for a, b in zip([y] + pooled, [y2] + pooled2):
        assert torch.equal(a.grad, b.grad)
    for (name, p), q in zip(fused.named_parameters(), modules.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(fused.named_buffers(), modules.buffers()):
        assert torch.equal(b, c), name
    with torch.no_grad():  # without autograd: the same operations; in eval mode the BatchNorm folded into fc1
        for a, b in zip(fused.weights_for(y, pooled), modules.weights_for(y2, pooled2)):
            if training:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_model_made_in_inference_mode_runs():
    """Parameters made in inference mode have no version counter, so the folded head is not cached for them:
    such a model still runs, and gives the numbers of the same model made normally."""
    torch.manual_seed(0)
    ref_model = timm.create_model('denseresnet110_n2', num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = timm.create_model('denseresnet110_n2', num_classes=10).eval()
        assert next(model.parameters()).is_inference()
        torch.testing.assert_close(model(x), ref_model(x), **TOL)


def test_folded_eval_head_follows_every_change_of_the_gate():
    """The inference head folds the BatchNorm into fc1 once and keeps it: it must be made again after an in-place
    change (an optimizer step, load_state_dict), a replaced parameter or a dtype change, and it must match the
    modules' result each time."""
    gate = make_gate(16, [16, 8, 16], 2, seed=3).eval()
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(4, 16, 5, 5, generator=gen)
    pooled = [torch.randn(4, 16, generator=gen) for _ in range(3)]

    def check(dtype=torch.float32):
        hooked = copy.deepcopy(gate)
        hooked.weights.register_forward_hook(lambda *_: None)  # the modules' path
        with torch.inference_mode():
            got = gate.weights_for(y.to(dtype), [p.to(dtype) for p in pooled])
            want = hooked.weights_for(y.to(dtype), [p.to(dtype) for p in pooled])
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (got[1][:, 1, 8:] == 0).all()  # the padding mask, folded into fc2's bias
        return got

    first = check()
    with torch.no_grad():
        gate.bn.running_var.mul_(3.0)  # in place, as a BatchNorm update or load_state_dict writes it
    second = check()
    assert not torch.allclose(first[0], second[0])
    gate.load_state_dict({k: v + 0.1 for k, v in gate.state_dict().items()})
    third = check()
    assert not torch.allclose(second[0], third[0])
    gate.fc2.bias = nn.Parameter(torch.zeros_like(gate.fc2.bias))  # replaced
    check()
    gate.double()
    check(torch.float64)


def test_inference_mix_reuses_only_a_temporary_branch_output():
    """``mix(..., reuse_y=True)`` accumulates into y when autograd does not record (as timm's blocks add their
    shortcut into the branch output); it never writes into y when autograd records, or when not asked to."""
    gen = torch.Generator().manual_seed(0)
    y, a1, a2 = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    v, w = torch.rand(2, 4, generator=gen), torch.softmax(torch.randn(2, 2, 4, generator=gen), 1)
    want = reference_mix(y, v, w, [a1, a2])
    with torch.no_grad():
        kept = y.clone()
        assert torch.allclose(DenseGate.mix(kept, v, w, [a1, a2]), want, **TOL) and torch.equal(kept, y)
        reused = y.clone()
        out = DenseGate.mix(reused, v, w, [a1, a2], reuse_y=True)
        assert out.data_ptr() == reused.data_ptr() and torch.allclose(out, want, **TOL)
    y_grad = y.clone().requires_grad_()
    out = DenseGate.mix(y_grad, v, w, [a1, a2], reuse_y=True)
    assert out.data_ptr() != y_grad.data_ptr() and torch.equal(y_grad.detach(), y)


def test_partial_gradients():
    """Only some inputs need a gradient (frozen gate, detached inbound): the others get none, the rest match."""
    gate = make_gate(16, [16, 8, 16], 2, seed=3).train()
    for p in gate.parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(gate)
    y, a1, a2, a3 = _inputs(3, 16, [16, 8, 16], (5, 5), seed=3)
    a2 = a2.detach()
    ry, ra1, ra3 = (t.detach().clone().requires_grad_() for t in (y, a1, a3))
    gate(y, [a1, a2, a3]).square().sum().backward()
    reference_gate(ref, ry, [ra1, a2.clone(), ra3])[0].square().sum().backward()
    for t, r in ((y, ry), (a1, ra1), (a3, ra3)):
        torch.testing.assert_close(t.grad, r.grad, **TOL)
    assert a2.grad is None


def test_autocast_bfloat16_matches_reference():
    """Under CPU autocast the gate's dtypes mix (bf16 maps, fp32 softmax); the fast path promotes like the
    straightforward formula does."""
    gate = make_gate(16, [16, 8], 2, seed=5).eval()
    y, a1, a2 = (t.detach().bfloat16() for t in _inputs(2, 16, [16, 8], (4, 4), seed=5))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = gate(y, [a1, a2])
        ref = reference_gate(gate, y, [a1, a2])[0]
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# whole networks: the dense blocks (with their cached pooled means) against the reference forward.
# In float64: float32 rounding differences (a matrix product for the 1x1 convs, fused multiply-adds) grow through
# 50 random blocks to ~1e-4; in float64 they stay far below 1e-5, while a wrong formula would still show.


def _step(model: nn.Module, forward, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = forward(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype))
    return out, x.grad


@pytest.mark.parametrize('name,size', [
    ('denseresnet110_n2', 32), ('denseresnet110_n4', 33), ('denseresnet110_n8', 27), ('denseresnet34_n6', 65)])
@pytest.mark.parametrize('training', [True, False])
def test_denseresnet_matches_reference_forward(name, size, training):
    torch.manual_seed(0)
    fast = timm.create_model(name).double()
    randomise(fast, seed=size)
    fast.train(training)
    ref = copy.deepcopy(fast)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    out, x_grad = _step(fast, fast, x)
    ref_out, ref_x_grad = _step(ref, lambda t: reference_denseresnet(ref, t), x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-5 * max(ref_x_grad.abs().max().item(), 1.0))
    _assert_grads_close(fast, ref)
    _assert_buffers_equal(fast, ref)


@pytest.mark.parametrize('training', [True, False])
def test_densemobilenetv2_matches_reference_forward(training):
    torch.manual_seed(0)
    fast = timm.create_model('densemobilenetv2_n4').double()
    randomise(fast, seed=4)
    fast.train(training)
    ref = copy.deepcopy(fast)
    x = torch.randn(2, 3, 65, 65, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, x_grad = _step(fast, fast, x)
    ref_out, ref_x_grad = _step(ref, lambda t: reference_densemobilenetv2(ref, t), x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-5 * max(ref_x_grad.abs().max().item(), 1.0))
    _assert_grads_close(fast, ref)
    _assert_buffers_equal(fast, ref)


def test_history_carries_each_output_pooled_once():
    """A dense block passes [pooled means..., outputs...] (at most N of each); the first takes the bare [x_0]."""
    model = timm.create_model('denseresnet110_n4').eval()
    history = [torch.randn(2, 16, 8, 8)]
    with torch.no_grad():
        for i, block in enumerate(list(model.layer1)[:5], start=1):
            out = block(history)
            kept = min(i + 1, 4)
            assert len(out) == 2 * kept
            assert out[kept:-1] == history[-(kept - 1):]  # the earlier outputs, passed on as they were
            for p, h in zip(out[:kept], out[kept:]):
                torch.testing.assert_close(p, h.mean((2, 3)), **TOL)
            history = out


# ---------------------------------------------------------------------------------------------------------------
# the pieces of the fast path, and the ways of running a model that take other paths (TorchScript, torch.fx,
# torch.compile use the plain formula or keep the fast functions as leaves)


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


def _fx_model(model: nn.Module) -> nn.Module:
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, [eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('training', [True, False])
def test_fx_traced_model_keeps_the_fast_functions_and_matches_eager(training):
    """timm's fx feature extraction (which drops unused results) keeps the weighted sum and the pool as leaves,
    and the traced network equals eager, gradients included."""
    torch.manual_seed(0)
    model = timm.create_model('denseresnet110_n2').double()
    randomise(model, seed=1)
    model.train(training)
    twin = copy.deepcopy(model)
    traced = _fx_model(model).train(training)
    targets = {n.target for n in traced.graph.nodes if n.op == 'call_function'}
    assert weighted_sum_lean_backward in targets and avg_pool_2x2 in targets
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, x_grad = _step(traced, lambda t: next(iter(traced(t).values())), x)
    ref_out, ref_x_grad = _step(twin, twin, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    _assert_grads_close(traced, twin)


def test_torchscript_trains_like_eager():
    """TorchScript takes the plain in-place formula (no custom autograd Function): same outputs and gradients."""
    torch.manual_seed(0)
    with timm.layers.set_scriptable(True):
        model = timm.create_model('denseresnet110_n2').double()
    randomise(model, seed=2)
    model.train()
    twin = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, x_grad = _step(scripted, scripted, x)
    ref_out, ref_x_grad = _step(twin, twin, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    _assert_grads_close(scripted, twin)


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """Under torch.compile the gate is the plain formula, for the compiler to fuse: same gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('denseresnet110_n2', layers=(2, 2, 2)).double()
    randomise(model, seed=3)
    model.train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, x_grad = _step(model, compiled, x)
    ref_out, ref_x_grad = _step(twin, twin, x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    _assert_grads_close(model, twin)


@pytest.mark.parametrize('inspect', [False, True], ids=['fused', 'modules'])
def test_training_after_inference_mode(inspect):
    """The padding mask that a gate caches is made outside inference mode: a model first run under
    torch.inference_mode then trains, with the fused gate and with the modules (hooked) alike."""
    model = timm.create_model('denseresnet110_n2', num_classes=4)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        model.eval()(x)
    masked = [b.gate.weights for b in model._blocks() if b.gate.weights.needs_mask]
    assert masked and all(w._mask is not None and not w._mask.is_inference() for w in masked)
    if inspect:
        for w in masked:
            w.register_forward_hook(lambda *_: None)
    model.train()(x).sum().backward()
    assert all(b.gate.fc2.weight.grad is not None for b in model._blocks())
