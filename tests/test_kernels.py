"""The compiled CPU kernels (timm_denseres/_kernels.py): the end of a dense block (csrc/gate_mix.cpp) and the gate
head (csrc/gate_head.cpp), against the gate's modules and the plain formula; building, loading and falling back."""
import copy
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import pytest
import timm
import torch
from torch.utils.cpp_extension import is_ninja_available

import timm_denseres  # noqa: F401  registers the models
from helpers import make_gate
from timm_denseres import _backends, _kernels
from timm_denseres.gate import DenseGate, mix

MIX_OP = 'timm_denseres::gate_mix'
can_build = shutil.which(os.environ.get('CXX', 'c++')) is not None and is_ninja_available()
needs_kernel = pytest.mark.skipif(not can_build, reason='no C++ compiler or ninja to build the kernels')


@pytest.fixture(autouse=True)
def _kernels_loaded():
    """Tests call the kernels' functions directly, which (unlike the gate) do not load them first."""
    if can_build:
        assert _kernels.kernel_available()


def _reference_mix(y, v, w, inbounds, relu):
    out = mix(y, v, w, inbounds)
    out = torch.relu(out) if relu else out
    return out, out.mean((2, 3))


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@contextmanager
def _compiled_ops_run() -> Iterator[Counter]:
    """A counter that holds, on exit, how often each of this package's compiled ops ran within."""
    ran: Counter = Counter()
    with torch.profiler.profile() as prof:
        yield ran
    ran.update(e.name for e in prof.events() if e.name.startswith('timm_denseres::'))


def _run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_DENSERES_FUSED'}
    env.update(env_changes)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=600)


@needs_kernel
def test_kernel_builds():
    assert _kernels.kernel_available()


@needs_kernel
@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('size', [(7, 7), (20, 20), (1, 3)])  # odd; over one 256-element chunk; tiny
@pytest.mark.parametrize('widths', [[8], [8, 8, 8], [8, 4, 8, 2]])  # narrow inbounds: earlier, narrower stages
@pytest.mark.parametrize('wanted', ['both', 'out', 'mean'])  # which results get a gradient
def test_gate_mix_matches_the_formula(relu, size, widths, wanted):
    gen = torch.Generator().manual_seed(len(widths) + size[0])
    y = torch.randn(3, 8, *size, generator=gen)
    inbounds = [torch.randn(3, c, *size, generator=gen) for c in widths]
    v, w = torch.rand(3, 8, generator=gen), torch.softmax(torch.randn(3, len(widths), 8, generator=gen), 1)
    ours, ref = _leaves([y, v, w] + inbounds), _leaves([y, v, w] + inbounds)
    out, mean = _kernels.gate_mix(ours[0], ours[1], ours[2], ours[3:], relu, reuse_y=False)
    ref_out, ref_mean = _reference_mix(ref[0], ref[1], ref[2], ref[3:], relu)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    g_out, g_mean = torch.randn(out.shape, generator=gen), torch.randn(mean.shape, generator=gen)
    loss = {'both': lambda o, m: (o * g_out).sum() + (m * g_mean).sum(), 'out': lambda o, m: (o * g_out).sum(),
            'mean': lambda o, m: (m * g_mean).sum()}[wanted]
    loss(out, mean).backward()
    loss(ref_out, ref_mean).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without autograd the result may be written into y itself
        y_copy = y.clone()
        out_inplace, _ = _kernels.gate_mix(y_copy, v, w, inbounds, relu, reuse_y=True)
    assert out_inplace.data_ptr() == y_copy.data_ptr()
    torch.testing.assert_close(out_inplace, ref_out.detach(), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_the_ops_reject_what_they_do_not_cover():
    """Called directly, the ops check their inputs (a clear error instead of reading memory they do not own)."""
    assert _kernels.kernel_available()
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
    gate = make_gate(16, [16, 16], 2, seed=0)
    y, means = torch.randn(4, 16, 3, 3), [torch.randn(4, 16) for _ in range(2)]
    bn = gate.bn
    params = [gate.fc1.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    train_op, eval_op = torch.ops.timm_denseres.gate_head_train, torch.ops.timm_denseres.gate_head_eval
    with pytest.raises(RuntimeError, match='parameters do not fit'):
        train_op(y, means + means[:1], *params, True, 0.1, 1e-5, gate.fc2.weight, gate.fc2.bias, [16, 16])
    with pytest.raises(RuntimeError, match='parameters do not fit'):
        eval_op(y, means + means[:1], *params, 1e-5, gate.fc2.weight, gate.fc2.bias, [16, 16])
    with pytest.raises(RuntimeError, match='more than one sample'):
        train_op(y[:1], [m[:1] for m in means], *params, True, 0.1, 1e-5, gate.fc2.weight, gate.fc2.bias, [16, 16])
    v, w, *saved = train_op(y, means, *params, True, 0.1, 1e-5, gate.fc2.weight, gate.fc2.bias, [16, 16])
    with pytest.raises(RuntimeError, match='do not fit together'):
        torch.ops.timm_denseres.gate_head_train_backward(None, None, v, w, *saved[:-1], saved[-1][:, 1:],
                                                         gate.fc1.weight, bn.weight, True)


@needs_kernel
@pytest.mark.parametrize('training,batch,grad', [(True, 4, True), (False, 4, True), (True, 1, True), (False, 4, False),
                                                 (True, 4, False)])
@pytest.mark.parametrize('valid', [[16, 16, 16], [16, 8, 16, 4]])  # padded (masked) inbound channels
@pytest.mark.parametrize('wanted', ['v and w', 'v', 'w'])  # which outputs a gradient comes back to
def test_gate_head_matches_the_modules(training, batch, grad, valid, wanted):
    """The compiled head (training, where a batch of one uses the running statistics; eval mode; with and
    without autograd) against the gate's modules: (v, w), the gradients of y, the means and every parameter, the
    BatchNorm's running statistics and batch count; and the compiled ops are what ran."""
    gate = make_gate(16, valid, 2, seed=7).train(training)
    modules = copy.deepcopy(gate)
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(batch, 16, 5, 6, generator=gen, requires_grad=grad)
    means = [torch.randn(batch, 16, generator=gen, requires_grad=grad) for _ in valid]
    y2, *means2 = [t.detach().clone().requires_grad_(grad) for t in [y] + means]
    grad_v = torch.randn(batch, 16, generator=gen) if 'v' in wanted else None
    grad_w = torch.randn(batch, len(valid), 16, generator=gen) if 'w' in wanted else None

    def loss(v, w):
        return sum((out * g).sum() for out, g in [(v, grad_v), (w, grad_w)] if g is not None)

    with torch.set_grad_enabled(grad), _compiled_ops_run() as ran:
        v, w = _kernels.gate_weights(gate, y, means)
        if grad:
            loss(v, w).backward()
    want_ops = {'timm_denseres::gate_head_train', 'timm_denseres::gate_head_train_backward'} if grad else (
        {'timm_denseres::gate_head_train'} if training and batch > 1 else {'timm_denseres::gate_head_eval'})
    assert want_ops <= set(ran)
    with torch.set_grad_enabled(grad):
        v2, w2 = modules.mixing_weights(y2, means2)
        if grad:
            loss(v2, w2).backward()
    torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    for k, width in enumerate(valid):
        assert torch.all(w[:, k, width:] == 0)  # padding gets weight 0
    if grad:
        for a, b in zip([y] + means, [y2] + means2):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(gate.named_parameters(), modules.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b), c in zip(gate.named_buffers(), modules.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


@needs_kernel
def test_gate_head_sigmoid_and_softmax_over_the_float_range():
    """The compiled head's own exp (a polynomial, so that it vectorises) against torch's sigmoid and softmax, with
    logits set exactly by fc2's bias (fc2's weight 0) from -200 to 200, far past where exp overflows float32: to a
    relative 1e-6 down to float32's smallest normal number, no inf or nan, and weights that still sum to 1."""
    channels, inbounds = 256, 4
    gate = DenseGate(channels, inbounds, 8, [channels] * inbounds).eval()
    width = (inbounds + 1) * channels
    logits = torch.linspace(-200.0, 200.0, width)[torch.randperm(width, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        gate.fc2.weight.zero_()
        gate.fc2.bias.copy_(logits)
        v, w = _kernels.gate_weights(gate, torch.randn(2, channels, 3, 3),
                                     [torch.randn(2, channels) for _ in range(inbounds)])
    tiny = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(v, torch.sigmoid(logits[:channels]).expand(2, -1), rtol=1e-6, atol=tiny)
    want_w = torch.softmax(logits[channels:].view(inbounds, channels), 0)
    assert (want_w > tiny).sum() > (want_w > 0.5).sum() > 0  # weights of every size, so the check means something
    torch.testing.assert_close(w, want_w.expand(2, -1, -1), rtol=1e-6, atol=tiny)
    assert torch.isfinite(v).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2, channels))


@needs_kernel
def test_nan_propagates_as_with_pytorch_ops():
    """A NaN stays a NaN, as with torch's relu, sigmoid and softmax (a diverged run must not look healthy): in the
    block's end and in the head, in inference and in training."""
    y, v, w = torch.randn(2, 4, 3, 3), torch.rand(2, 4), torch.rand(2, 1, 4)
    y[0, 1, 2, 2] = float('nan')
    out, mean = torch.ops.timm_denseres.gate_mix(y, v, w, [torch.randn(2, 4, 3, 3)], True, False)
    assert out[0, 1, 2, 2].isnan() and mean[0, 1].isnan() and not out[0, 1, :2].isnan().any()
    gate = make_gate(16, [16, 16], 2, seed=1)
    y, means = torch.randn(3, 16, 3, 3), [torch.randn(3, 16) for _ in range(2)]
    means[1][1, 5] = float('nan')
    for training in (False, True):
        with torch.no_grad():
            v, w = _kernels.gate_weights(gate.train(training), y, means)
        assert v[1].isnan().all() and w[1].isnan().all()  # sample 1's gate input has a NaN
        if not training:  # batch statistics mix the samples, so there the NaN reaches every sample, as in torch
            assert not v[[0, 2]].isnan().any() and not w[[0, 2]].isnan().any()


def test_what_the_kernels_do_not_cover():
    y, a, m = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 4)
    assert not _kernels.covers(y.double(), [a.double()], [m.double()])
    assert not _kernels.covers(y.to(memory_format=torch.channels_last), [a], [m])
    assert not _kernels.covers(y, [torch.randn(2, 4, 3, 3)], [m])  # not y's size
    assert not _kernels.covers(y, [torch.randn(2, 6, 5, 5)], [m])  # wider than y
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _kernels.covers(y, [a], [m])
    model = timm.create_model('test_denseresnet')
    with _backends.kernels_disabled():  # the gates' choice, whatever the tensors
        assert all(block.gate._backend(y, [a], [m]) is None for block in model.dense_blocks())


@needs_kernel
@pytest.mark.parametrize('name,size,train', [
    ('denseresnet110_n4', 32, False), ('denseresnet110_n4', 32, True), ('test_densemobilenetv2', 64, False)])
def test_models_with_and_without_the_kernels_agree(name, size, train):
    """The whole model, forward and every parameter's gradient, with the kernels and with the gate's modules."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train(train)
    x = torch.randn(4, 3, size, size)
    results = []
    for disabled in (False, True):
        model.zero_grad()
        state = {k: t.clone() for k, t in model.state_dict().items()}  # BatchNorm statistics move in training
        with _backends.kernels_disabled() if disabled else torch.enable_grad():
            with _compiled_ops_run() as ran:
                out = model(x)
                out.square().mean().backward()
        model.load_state_dict(state)
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, MIX_OP in ran))
    (out, grads, used), (ref_out, ref_grads, ref_used) = results
    assert used and not ref_used
    # float32 rounding differs inside the kernels (1e-5 above); through 17-54 blocks and training-mode BatchNorm it
    # grows to a few 1e-5
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@needs_kernel
def test_a_hook_on_any_module_the_kernels_stand_for_keeps_the_modules():
    """A forward hook on the gate's out_act (the block's feature point) or its head's activation sees its call;
    in inference mode without hooks the kernels run."""
    model = timm.create_model('test_denseresnet').eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = model(x)
        with _compiled_ops_run() as ran:
            model(x)
        assert ran[MIX_OP] == len(model.dense_blocks())
        for module in (model.layer1[1].gate.out_act, model.layer2[0].gate.act):
            seen = []
            handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
            try:
                with _compiled_ops_run() as ran:
                    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
            finally:
                handle.remove()
            assert len(seen) == 1 and ran[MIX_OP] == len(model.dense_blocks()) - 1  # that block: its modules


def test_environment_variable_turns_the_kernels_off():
    result = _run_python('from timm_denseres import _kernels; print(_kernels.kernel_available())',
                         TIMM_DENSERES_FUSED='0')
    assert result.returncode == 0 and result.stdout.strip() == 'False', result.stderr


_RUN_MODEL = '''
    import warnings
    import timm, torch
    import timm_denseres
    from timm_denseres import _backends, _kernels
    torch.manual_seed(0)
    model = timm.create_model('test_denseresnet').eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with torch.no_grad():
            out = model(x)
            model(x)
    with _backends.kernels_disabled(), torch.no_grad():
        ref = model(x)
    messages = [str(w.message) for w in caught if 'timm_denseres' in str(w.message)]
    print(len(messages), _kernels.kernel_available(), torch.allclose(out, ref, atol=1e-5))
    print(messages[0] if messages else '')
'''


def test_a_failed_build_warns_once_with_its_cause_and_the_model_still_runs(tmp_path):
    """No working compiler: the one line that says a build starts, then one warning that names the cause (not
    ninja's last words) and what happens instead; the model's output is the modules' output."""
    result = _run_python(_RUN_MODEL, CXX=str(tmp_path / 'no-such-compiler'),
                         TORCH_EXTENSIONS_DIR=str(tmp_path / 'ext'))
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.strip().splitlines()[:2]
    assert first == '1 False True'
    assert 'could not be built' in message and 'PyTorch operations instead' in message
    assert 'no-such-compiler' in message and 'ninja: build stopped' not in message
    assert result.stderr.strip().startswith('timm_denseres: building the CPU gate kernels')  # the one line
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unusable_cache_warns_in_one_line_and_the_first_forward_works(tmp_path):
    """HOME is a file, so no cache folder can be made under it: the first forward still runs (the modules), and
    stderr holds one line, the warning."""
    home = tmp_path / 'home'
    home.write_text('')
    code = ('import timm, torch, timm_denseres; '
            'print(timm.create_model("test_denseresnet")(torch.randn(2, 3, 16, 16)).shape)')
    env = {k: v for k, v in os.environ.items() if k not in ('TORCH_EXTENSIONS_DIR', 'XDG_CACHE_HOME')}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                            env=dict(env, HOME=str(home)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'torch.Size([2, 10])'
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'could not be built' in lines[0] and 'NotADirectoryError' in lines[0], lines


@needs_kernel
def test_a_finished_build_loads_silently_and_writes_nothing(tmp_path):
    """A cache that holds the finished build of these sources (copied from this process's) is loaded as it is:
    nothing on stderr (no build line, no CUDA-runtime warning on a CPU machine), nothing written (no lock file: a
    read-only cache works)."""
    assert _kernels.kernel_available()
    name, _ = _kernels._build_name()
    built = _kernels._cpp_extension()._get_build_directory(name, verbose=False)
    ext = tmp_path / 'ext'
    shutil.copytree(built, ext / os.path.basename(built))
    files = {p: p.stat().st_mtime_ns for p in ext.rglob('*')}
    for path in files:  # read-only, the way a shared or packaged cache may be (root writes all the same: so the
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))  # files are compared too)
    try:
        result = _run_python(_RUN_MODEL, TORCH_EXTENSIONS_DIR=str(ext))
    finally:
        for path in files:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert result.returncode == 0 and result.stdout.startswith('0 True True'), result.stderr
    assert result.stderr.strip() == ''
    assert {p: p.stat().st_mtime_ns for p in ext.rglob('*')} == files
