"""The compiled CPU kernels (timm_denseres/fused.py): the end of a dense block (csrc/gate_mix.cpp) and the gate head
(csrc/gate_head.cpp), in inference and in training. The same numbers as the PyTorch operations (to 1e-5, forward
and backward), used by the models where they apply and only there, and a clean fallback where they cannot be
built."""
import copy
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from typing import Iterator, Set

import pytest
import timm
import torch
from torch.utils.cpp_extension import is_ninja_available

import timm_denseres  # noqa: F401  registers the models
from helpers import make_gate
from timm_denseres import fused
from timm_denseres.gate import DenseGate, global_avg_pool, weighted_sum

KERNEL_OP = 'timm_denseres::gate_mix'
can_build = shutil.which(os.environ.get('CXX', 'c++')) is not None and is_ninja_available()
needs_kernel = pytest.mark.skipif(not can_build, reason='no C++ compiler or ninja to build the kernel')


def _reference(y, v, w, inbounds, relu):
    out = weighted_sum(y * 1, v, w, inbounds)  # y * 1: the in-place sum must not touch the leaf
    out = torch.relu(out) if relu else out
    return out, global_avg_pool(out)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@contextmanager
def _compiled_ops_run() -> Iterator[Set[str]]:
    """A set that holds, on exit, the names of this package's compiled ops that ran within."""
    ran: Set[str] = set()
    with torch.profiler.profile() as prof:
        yield ran
    ran.update(e.name for e in prof.events() if e.name.startswith('timm_denseres::'))


@needs_kernel
def test_kernel_builds():
    assert fused.kernel_available()
    assert hasattr(torch.ops.timm_denseres, 'gate_mix')


@needs_kernel
@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('size', [(7, 7), (20, 20), (1, 3)])  # odd; over one 256-element chunk; tiny
@pytest.mark.parametrize('widths', [[8], [8, 8, 8], [8, 4, 8, 2]])  # narrow inbounds: earlier, narrower stages
@pytest.mark.parametrize('wanted', ['both', 'out', 'mean'])  # which results get a gradient
def test_kernel_matches_pytorch_ops(relu, size, widths, wanted):
    torch.manual_seed(0)
    batch, channels, n = 3, 8, len(widths)
    y = torch.randn(batch, channels, *size)
    v = torch.rand(batch, channels)
    w = torch.softmax(torch.randn(batch, n, channels), 1)
    inbounds = [torch.randn(batch, c, *size) for c in widths]
    ours, ref = _leaves([y, v, w] + inbounds), _leaves([y, v, w] + inbounds)
    out, mean = fused.gate_mix(ours[0], ours[1], ours[2], ours[3:], relu=relu)
    ref_out, ref_mean = _reference(ref[0], ref[1], ref[2], ref[3:], relu)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    grad, grad_mean = torch.randn_like(out), torch.randn_like(mean)
    picks = {'both': [0, 1], 'out': [0], 'mean': [1]}[wanted]
    torch.autograd.backward([[out, mean][i] for i in picks], [[grad, grad_mean][i] for i in picks])
    torch.autograd.backward([[ref_out, ref_mean][i] for i in picks], [[grad, grad_mean][i] for i in picks])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    # without autograd, written into y (reuse_y), as the blocks do in inference
    with torch.no_grad():
        y_copy = y.clone()
        out_inplace, _ = fused.gate_mix(y_copy, v, w, inbounds, relu=relu, reuse_y=True)
    assert out_inplace.data_ptr() == y_copy.data_ptr()
    torch.testing.assert_close(out_inplace, ref_out.detach(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_ops_reject_what_they_do_not_cover():
    """Called directly, the ops check their inputs (a clear error instead of reading memory they do not own)."""
    assert fused.kernel_available()
    y, v, w = torch.randn(2, 4, 5, 5), torch.rand(2, 4), torch.rand(2, 1, 4)
    a = torch.randn(2, 4, 5, 5)
    bad_calls = {
        'y must be': (y.double(), v, w, [a]),
        'v must be': (y, v[:, :3], w, [a]),
        'w must be': (y, v, torch.rand(2, 2, 4), [a]),
        'each inbound': (y, v, w, [torch.randn(2, 4, 4, 4)]),
    }
    for message, args in bad_calls.items():
        with pytest.raises(RuntimeError, match=message):
            torch.ops.timm_denseres.gate_mix(*args, True, False)
    out, _ = torch.ops.timm_denseres.gate_mix(y, v, w, [a], True, False)
    with pytest.raises(RuntimeError, match='grad and out'):
        torch.ops.timm_denseres.gate_mix_backward(out[:, :2], None, out, y, v, w, [a], True)


@needs_kernel
@pytest.mark.parametrize('valid', [[16, 16, 16], [16, 8, 16, 8], [16]])  # padded (masked) inbound channels
def test_inference_gate_head_matches_the_modules(valid):
    """The gate's (v, w) in inference by the compiled head, against the gate's modules (its BatchNorm with
    running statistics, the padding mask): to 1e-5, and the compiled op is what ran."""
    gate = make_gate(16, valid, 2, seed=0).eval()
    y = torch.randn(4, 16, 6, 6)
    pooled = [torch.randn(4, 16) for _ in valid]
    with torch.no_grad():
        want = gate.weights_from_pooled([global_avg_pool(y)] + pooled)
        with _compiled_ops_run() as ran:
            got = gate.weights_for(y, pooled)
    assert 'timm_denseres::gate_head_eval' in ran
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[1].sum(1) - 1).abs().max() < 1e-6
    for k, width in enumerate(valid):
        assert torch.all(got[1][:, k, width:] == 0)  # padding gets weight 0
    with pytest.raises(RuntimeError, match='folded parameters do not fit'):
        torch.ops.timm_denseres.gate_head_eval(y, pooled[:-1] + [pooled[0], pooled[0]], *gate._eval_head.get(gate))


@needs_kernel
def test_inference_gate_head_sigmoid_and_softmax_over_the_float_range():
    """The compiled head's own exp (a polynomial, so that it vectorises) against torch's sigmoid and softmax, with
    logits set exactly by fc2's bias (fc2's weight 0) from -200 to 200, far past where exp overflows float32: to a
    relative 1e-6 (a few float32 ulp) down to float32's smallest normal number (so tiny weights are right too, not
    only large ones), no inf or nan, and weights that still sum to 1."""
    channels, inbounds = 256, 4
    gate = DenseGate(channels, inbounds, 8, [channels] * inbounds).eval()
    width = (inbounds + 1) * channels
    logits = torch.linspace(-200.0, 200.0, width)[torch.randperm(width, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        gate.fc2.weight.zero_()
        gate.fc2.bias.copy_(logits)
        with _compiled_ops_run() as ran:
            v, w = gate.weights_for(torch.randn(2, channels, 3, 3), [torch.randn(2, channels) for _ in range(inbounds)])
    assert 'timm_denseres::gate_head_eval' in ran
    tiny = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(v, torch.sigmoid(logits[:channels]).expand(2, -1), rtol=1e-6, atol=tiny)
    want_w = torch.softmax(logits[channels:].view(inbounds, channels), 0)
    assert (want_w > tiny).sum() > (want_w > 0.5).sum() > 0  # weights of every size, so the check means something
    torch.testing.assert_close(w, want_w.expand(2, -1, -1), rtol=1e-6, atol=tiny)
    assert torch.isfinite(v).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2, channels))


@needs_kernel
@pytest.mark.parametrize('training,batch', [(True, 4), (False, 4), (True, 1)])
@pytest.mark.parametrize('valid', [[16, 16, 16], [16, 8, 16, 4]])  # padded (masked) inbound channels
@pytest.mark.parametrize('wanted', ['v and w', 'v', 'w'])  # which outputs a gradient comes back to
def test_training_gate_head_matches_the_modules(training, batch, valid, wanted):
    """The compiled gate head with autograd (training, where a batch of one uses the running statistics, and eval
    mode with gradients) against the gate's modules: (v, w); the gradients of y, of the inbounds' means and of every
    parameter; the BatchNorm's running statistics and batch count, to 1e-5; and the compiled ops are what ran.
    Then without autograd in the same mode: the same (v, w) and statistics."""
    gate = make_gate(16, valid, 2, seed=7).train(training)
    modules = copy.deepcopy(gate)
    modules.weights.register_forward_hook(lambda *_: None)  # a hook: this one calls its modules
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(batch, 16, 5, 6, generator=gen, requires_grad=True)
    pooled = [torch.randn(batch, 16, generator=gen, requires_grad=True) for _ in valid]
    y2, *pooled2 = _leaves([y] + pooled)
    grad_v = torch.randn(batch, 16, generator=gen) if 'v' in wanted else None
    grad_w = torch.randn(batch, len(valid), 16, generator=gen) if 'w' in wanted else None

    def loss(v, w):
        return sum((out * g).sum() for out, g in [(v, grad_v), (w, grad_w)] if g is not None)

    with _compiled_ops_run() as ran:
        v, w = gate.weights_for(y, pooled)
        loss(v, w).backward()
    assert {'timm_denseres::gate_head_train', 'timm_denseres::gate_head_train_backward'} <= ran
    v2, w2 = modules.weights_for(y2, pooled2)
    loss(v2, w2).backward()
    torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    for k, width in enumerate(valid):
        assert torch.all(w[:, k, width:] == 0)  # padding gets weight 0
    for a, b in zip([y] + pooled, [y2] + pooled2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(gate.named_parameters(), modules.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b), c in zip(gate.named_buffers(), modules.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    if training:  # without autograd, in training mode: the compiled forward alone, which updates the statistics
        with torch.no_grad():
            got, want = gate.weights_for(y, pooled), modules.weights_for(y2, pooled2)
        for a, b in zip(list(got) + list(gate.buffers()), list(want) + list(modules.buffers())):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_the_training_head_ops_reject_what_does_not_fit():
    """Clear errors from the compiled training head for parameters of another gate, batch statistics of one
    sample, and saved tensors that do not belong together."""
    gate = make_gate(16, [16, 16], 2, seed=0)
    y, pooled = torch.randn(4, 16, 3, 3), [torch.randn(4, 16) for _ in range(2)]
    bn = gate.bn
    args = [gate.fc1.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, 0.1, 1e-5,
            gate.fc2.weight, gate.fc2.bias, [16, 16]]
    op = torch.ops.timm_denseres.gate_head_train
    with pytest.raises(RuntimeError, match='parameters do not fit'):
        op(y, pooled + pooled[:1], *args)
    with pytest.raises(RuntimeError, match='more than one sample'):
        op(y[:1], [p[:1] for p in pooled], *args)
    v, w, *saved = op(y, pooled, *args)
    with pytest.raises(RuntimeError, match='do not fit together'):
        torch.ops.timm_denseres.gate_head_train_backward(None, None, v, w, *saved[:-1], saved[-1][:, 1:],
                                                         gate.fc1.weight, bn.weight, True)


@needs_kernel
def test_nan_propagates_as_with_pytorch_ops():
    """A NaN stays a NaN, as with torch's relu, sigmoid and softmax (a diverged run must not look healthy): in the
    block's end, in the inference head and in the training head."""
    assert fused.kernel_available()
    y, v, w = torch.randn(2, 4, 3, 3), torch.rand(2, 4), torch.rand(2, 1, 4)
    y[0, 1, 2, 2] = float('nan')
    out, mean = torch.ops.timm_denseres.gate_mix(y, v, w, [torch.randn(2, 4, 3, 3)], True, False)
    assert out[0, 1, 2, 2].isnan() and mean[0, 1].isnan() and not out[0, 1, :2].isnan().any()
    gate = make_gate(16, [16, 16], 2, seed=1)
    y, pooled = torch.randn(3, 16, 3, 3), [torch.randn(3, 16) for _ in range(2)]
    pooled[1][1, 5] = float('nan')
    for training in (False, True):
        gate.train(training)
        with torch.no_grad():
            with _compiled_ops_run() as ran:
                v, w = gate.weights_for(y, pooled)
        assert {'timm_denseres::gate_head_eval', 'timm_denseres::gate_head_train'} & ran
        assert v[1].isnan().all() and w[1].isnan().all()  # sample 1's gate input has a NaN
        if not training:  # batch statistics mix the samples, so there the NaN reaches every sample, as in torch
            assert not v[[0, 2]].isnan().any() and not w[[0, 2]].isnan().any()


def test_inputs_the_kernel_does_not_cover_fall_back():
    """None (the caller then uses PyTorch operations) for what the kernel does not cover."""
    y, v, w = torch.randn(2, 4, 5, 5), torch.rand(2, 4), torch.rand(2, 1, 4)
    a = torch.randn(2, 4, 5, 5)
    assert fused.gate_mix(y.double(), v.double(), w.double(), [a.double()], relu=True) is None
    assert fused.gate_mix(y.to(memory_format=torch.channels_last), v, w, [a], relu=True) is None
    assert fused.gate_mix(y, v, w, [torch.randn(2, 4, 3, 3)], relu=True) is None  # not y's size
    assert fused.gate_mix(y, v, w, [torch.randn(2, 6, 5, 5)], relu=True) is None  # wider than y
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert fused.gate_mix(y, v, w, [a], relu=True) is None
    with fused.kernel_disabled():
        assert fused.gate_mix(y, v, w, [a], relu=True) is None


@needs_kernel
@pytest.mark.parametrize('name,size,train', [
    ('denseresnet110_n4', 32, False), ('denseresnet110_n4', 32, True), ('densemobilenetv2_n2', 64, False)])
def test_models_with_and_without_the_kernel_agree(name, size, train):
    """The whole model, forward and every parameter's gradient, with the kernel and with PyTorch operations
    (in eval mode the backward runs through the kernel's autograd node too). Not DenseMobileNetV2 with
    training-mode BatchNorm: at random init and batch 4, the kernel's float32 means (1e-7 from PyTorch's, another
    summation order) flip an activation somewhere and move conv_stem's gradient by 2 %, while its backward, fed
    PyTorch's means, gives PyTorch's gradients exactly (measured); that network, not the kernel, is ill-conditioned."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train(train)
    x = torch.randn(4, 3, size, size)
    results = []
    for disabled in (False, True):
        model.zero_grad()
        state = {k: t.clone() for k, t in model.state_dict().items()}  # BatchNorm statistics move in training
        with fused.kernel_disabled() if disabled else torch.enable_grad():
            with _compiled_ops_run() as ran:
                out = model(x)
                out.square().mean().backward()
        model.load_state_dict(state)
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, KERNEL_OP in ran))
    (out, grads, used), (ref_out, ref_grads, ref_used) = results
    assert used and not ref_used
    # float32 rounding differs inside the kernel (1e-5 above); through 17-54 blocks and training-mode BatchNorm it
    # grows to a few 1e-5
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@needs_kernel
def test_hooks_and_inference_use():
    """A forward hook on the activation the kernel would apply keeps the module path (the hook sees it); in
    inference mode the kernel runs, writing into the branch output."""
    model = timm.create_model('denseresnet110_n2', num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = model(x)
        with _compiled_ops_run() as ran:
            model(x)
        assert KERNEL_OP in ran
        seen = []
        handle = model.layer1[1].act2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        try:
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
        finally:
            handle.remove()
    assert seen == [torch.Size([2, 16, 16, 16])]


def test_environment_variable_turns_the_kernel_off():
    code = 'from timm_denseres import fused; print(fused.kernel_available())'
    env = {**os.environ, 'TIMM_DENSERES_FUSED': '0'}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == 'False', result.stderr


def test_a_failed_build_warns_once_and_the_model_still_runs(tmp_path):
    """No working compiler: one warning that says what failed and what happens instead; the model's output is
    the PyTorch operations' output."""
    code = textwrap.dedent('''
        import warnings
        import timm, torch
        import timm_denseres
        from timm_denseres import fused
        torch.manual_seed(0)
        model = timm.create_model('denseresnet110_n2', num_classes=10).eval()
        x = torch.randn(2, 3, 16, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            with torch.no_grad():
                out = model(x)
                model(x)
        with fused.kernel_disabled(), torch.no_grad():
            ref = model(x)
        messages = [str(w.message) for w in caught if 'timm_denseres' in str(w.message)]
        print(len(messages), fused.kernel_available(), torch.equal(out, ref))
        print(messages[0] if messages else '')
    ''')
    env = {**os.environ, 'CXX': str(tmp_path / 'no-such-compiler'), 'TORCH_EXTENSIONS_DIR': str(tmp_path / 'ext')}
    env.pop('TIMM_DENSERES_FUSED', None)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.strip().splitlines()[:2]
    assert first == '1 False True'
    assert 'could not be built' in message and 'PyTorch operations instead' in message
