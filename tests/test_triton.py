"""The gate's Triton kernels (timm_denseres/_triton_kernels.py, the CUDA path), run on CPU tensors under Triton's
interpreter, against the formula of test_gate.py: values, every gradient and the BatchNorm statistics, for the
cases a model meets (training and eval, a single sample, channels_last, inbounds narrower than y, ReLU or none,
a logit scale, drop-path, half precision), and whole models; and the number of operations of a training step."""
import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_denseres  # noqa: F401  registers the models
from helpers import make_gate, randomise
from test_gate import GATE_CASES, REFERENCES, TOL, gate_inputs, reference_gate
from timm_denseres import _backends
from timm_denseres._dense import pad_channels

pytest.importorskip('triton')
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """The CUDA path on CPU: Triton's interpreter on, the C++ kernels off."""
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setenv('TIMM_DENSERES_FUSED', '0')


def launches() -> int:
    from timm_denseres import _triton_kernels
    return _triton_kernels.launches[0]


def check_gate(gate, inputs, ref_inputs, grad_seed=1, tol=TOL):
    """The gate on the Triton path against the reference (outputs, every gradient, the BatchNorm statistics);
    returns the number of Triton launches it made."""
    ref = copy.deepcopy(gate)
    before_launches = launches() if 'timm_denseres._triton_kernels' in sys.modules else 0
    y, inbounds = inputs[0], inputs[1:]
    out, out_mean = gate(y, inbounds, [pad_channels(a.mean((2, 3)), y.shape[1]) for a in inbounds], y)
    ref_out, _, _ = reference_gate(ref, ref_inputs[0], ref_inputs[1:])
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(out_mean.float(), ref_out.mean((2, 3)), **tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(grad.to(out.dtype))
    ref_out.backward(grad)
    for k, (t, r) in enumerate(zip(inputs, ref_inputs)):
        torch.testing.assert_close(t.grad.float(), r.grad[:, :t.shape[1]], **tol, msg=lambda m, k=k: f'input {k}: {m}')
    for (name, p), (_, q) in zip(gate.named_parameters(), ref.named_parameters()):
        scale = max(q.grad.abs().max().item(), 1.0)
        torch.testing.assert_close(p.grad, q.grad, rtol=tol['rtol'], atol=tol['atol'] * scale, msg=name)
    for (name, b), (_, c) in zip(gate.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b.float(), c.float(), **tol, msg=name)
    return launches() - before_launches


def narrowed(inputs, valid, channels_last=False):
    """The inbounds without their zero padding, as the models keep their history."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [inputs[0].detach().clone().requires_grad_()] + [
        a.detach()[:, :c].contiguous(memory_format=memory_format).requires_grad_() for a, c in zip(inputs[1:], valid)]


@pytest.mark.parametrize('channels,valid,size,reduction', GATE_CASES)
@pytest.mark.parametrize('training,batch', [(True, 3), (False, 3), (True, 1)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_gate_matches_reference(channels, valid, size, reduction, training, batch, channels_last):
    relu = len(valid) % 2 == 1  # both block ends, ReLU (DenseResNet) and none (DenseMobileNetV2), across the cases
    gate = make_gate(channels, valid, reduction, seed=channels + len(valid), relu=relu).train(training)
    ref_inputs = gate_inputs(batch, channels, valid, size, seed=len(valid), channels_last=channels_last)
    inputs = narrowed(ref_inputs, valid, channels_last)
    # one node: the head's first half and the mix with the second; v and w, the head (two), the maps backward
    assert check_gate(gate, inputs, ref_inputs) == 5


def test_padded_inbounds_and_a_logit_scale():
    """Inbounds given with their zero padding, and fc2's logits scaled (the gates' learning speed)."""
    valid = [16, 8, 16, 8]
    gate = make_gate(16, valid, 2, seed=3, relu=True).train()
    gate.logit_scale = 7.0
    ref_inputs = gate_inputs(4, 16, valid, (6, 6), seed=2)
    inputs = [t.detach().clone().requires_grad_() for t in ref_inputs]
    assert check_gate(gate, inputs, ref_inputs) == 5


def test_inference_writes_into_y_and_reports_v_and_w():
    valid = [16, 16, 8]
    gate = make_gate(16, valid, 2, seed=4, relu=True).eval()
    padded = [t.detach() for t in gate_inputs(2, 16, valid, (5, 5), seed=3)]
    with torch.no_grad():
        ref_out, ref_v, ref_w = reference_gate(copy.deepcopy(gate), padded[0], padded[1:])
    inbounds = [a[:, :c].contiguous() for a, c in zip(padded[1:], valid)]
    seen = []
    gate.observer = lambda g, v, w: seen.append((v, w))
    with torch.no_grad():
        y = padded[0].clone()
        out, out_mean = gate(y, inbounds, [a.mean((2, 3)) for a in padded[1:]], y)
    assert out.data_ptr() == y.data_ptr()  # nothing reads y afterwards
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(out_mean, ref_out.mean((2, 3)), **TOL)
    (v, w), = seen  # the observer sees the gate's v and w on this path too
    torch.testing.assert_close(v, ref_v, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, dict(rtol=2e-2, atol=3e-2)),
                                       (torch.float16, dict(rtol=2e-3, atol=3e-3))])
def test_half_precision_maps(dtype, tol):
    """Maps in bfloat16 or float16 (as under autocast), the gate's parameters in float32; computed in float32."""
    valid = [16, 8, 16]
    gate = make_gate(16, valid, 2, seed=5, relu=True).train()
    ref_inputs = narrowed(gate_inputs(3, 16, valid, (5, 5), seed=4), valid)
    inputs = [t.detach().to(dtype).requires_grad_() for t in ref_inputs]
    ref_inputs = [t.detach().to(dtype).float().requires_grad_() for t in ref_inputs]
    padded = [ref_inputs[0]] + [torch.nn.functional.pad(a, [0, 0, 0, 0, 0, 16 - a.shape[1]])
                                for a in ref_inputs[1:]]
    padded = [t.detach().requires_grad_() for t in padded]
    check_gate(gate, inputs, padded, tol=tol)
    assert all(t.grad.dtype == dtype for t in inputs)


def test_float64_and_hooked_gates_keep_the_formula():
    valid = [8, 8]
    gate = make_gate(8, valid, 2, seed=6).double()
    y, a, b = (torch.randn(2, 8, 3, 3, dtype=torch.float64) for _ in range(3))
    means = [a.mean((2, 3)), b.mean((2, 3))]
    assert gate._backend(y, [a, b], means) is None
    gate.float()
    y, a, b = y.float(), a.float(), b.float()
    assert gate._backend(y, [a, b], [m.float() for m in means]) is not None
    gate.weights.register_forward_hook(lambda *args: None)
    assert gate._backend(y, [a, b], [m.float() for m in means]) is None


@pytest.mark.parametrize('name,size', [('test_denseresnet', 16), ('test_densemobilenetv2', 32)])
@pytest.mark.parametrize('train', [True, False])
def test_models_match_the_formula(name, size, train):
    """Whole models (drop-path on in training), forward and every parameter's gradient: Triton path and formula."""
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, num_classes=10, drop_path_rate=0.2 if train else 0.0), seed=1)
    model.train(train)
    x = torch.randn(3, 3, size, size)
    results = []
    for disabled in (False, True):
        model.zero_grad()
        state = {k: t.clone() for k, t in model.state_dict().items()}
        torch.manual_seed(5)  # the same drop-path draws
        before = launches() if 'timm_denseres._triton_kernels' in sys.modules else 0
        with _backends.kernels_disabled() if disabled else torch.enable_grad():
            out = model(x)
            out.square().mean().backward()
        used = 'timm_denseres._triton_kernels' in sys.modules and launches() > before
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, used,
                        {k: t.clone() for k, t in model.state_dict().items()}))
        model.load_state_dict(state)
    (out, grads, used, buffers), (ref_out, ref_grads, ref_used, ref_buffers) = results
    assert used and not ref_used
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for n in grads:
        scale = max(ref_grads[n].abs().max().item(), 1e-3)
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-4 * scale, msg=n)
    for k in buffers:
        torch.testing.assert_close(buffers[k], ref_buffers[k], rtol=1e-4, atol=1e-5, msg=k)


def test_model_equals_the_papers_formula():
    """denseresnet110-like depth on the Triton path against the plain reference of test_gate.py."""
    torch.manual_seed(0)
    model = randomise(timm.create_model('test_denseresnet'), seed=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), REFERENCES['test_denseresnet'](model, x), rtol=1e-4, atol=1e-5)


def _benchmark_tool():
    spec = importlib.util.spec_from_file_location('benchmark_tool', ROOT / 'tools' / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_training_step_operations_at_most_1_4x_resnet110():
    """The CUDA path's operations per training step, dense / baseline (a Triton launch counts as one; the count
    does not depend on the image size, so it runs at 8x8)."""
    benchmark = _benchmark_tool()
    dense, base = (sum(benchmark.count_ops(name, 8).values()) for name in ('denseresnet110_n4', 'resnet110'))
    assert dense / base <= 1.4, (dense, base)  # 1206 / 899 = 1.34 at 5 launches a gate
    with _backends.kernels_disabled():  # the formula: over twice as many
        plain = sum(benchmark.count_ops('denseresnet110_n4', 8).values())
    assert plain / base > 4.4, (plain, base)


@pytest.mark.slow
def test_the_kernels_compile_for_sm90():
    """Every kernel a training and an inference step of a dense model launch, compiled by Triton's own compiler
    for sm_90 (H100, H200) down to a cubin, without a GPU: the GPU compiler takes what the interpreter runs."""
    env = {k: v for k, v in __import__('os').environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, 'tools/compile_kernels.py', '--models', 'test_denseresnet:16',
                             '--formats', 'float32', '--arch', '90'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert 'Warning' not in result.stderr, result.stderr  # Triton 3.9 warns where a launch leaves an option unset
    assert 'compiled for sm_90' in result.stdout
    for kernel in ('_head_in_kernel', '_mix_fwd_kernel', '_mix_bwd_kernel', '_head_grad_kernel'):
        assert f'| {kernel} |' in result.stdout, result.stdout


def test_a_cpu_run_without_the_interpreter_never_imports_triton_kernels():
    code = ('import sys, timm, torch, timm_denseres; m = timm.create_model("test_denseresnet"); '
            'm(torch.randn(2, 3, 16, 16)).sum().backward(); '
            'print("timm_denseres._triton_kernels" in sys.modules)')
    env = {k: v for k, v in __import__('os').environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'False'


def test_a_model_compiles_in_one_graph_where_the_kernels_are_available():
    """torch.compile on the CUDA path: the compiled graph takes the formula (inductor fuses it) and has no graph
    break (fullgraph=True raises at one), with the same numbers as the kernels in eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomise(timm.create_model('test_denseresnet', num_classes=10), seed=3).eval()
    x = torch.randn(2, 3, 16, 16)
    before = launches() if 'timm_denseres._triton_kernels' in sys.modules else 0
    with torch.no_grad():
        eager = model(x)
        assert launches() > before  # the eager forward ran the kernels
        compiled = torch.compile(model, backend='eager', fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
