"""Compiles the gate's Triton kernels for an NVIDIA GPU on a machine without one, and reports their registers and
spills.

A child process runs small dense models on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), a training
step and an inference step in float32 NCHW and in bfloat16 channels_last, and records every distinct kernel
specialisation it launches (argument types and constexprs). This process then compiles each one with Triton's own
compiler to PTX and a cubin for the chosen architecture (Triton's bundled ptxas; no driver, no GPU) and reads the
cubin's resource usage with the bundled cuobjdump. A kernel that the interpreter runs but the GPU compiler rejects
fails here.

    python tools/compile_kernels.py               # sm_90 (H100, H200)
    python tools/compile_kernels.py --arch 80     # sm_80 (A100)
"""
import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {'float32': ('float32', 'contiguous_format'), 'bfloat16-channels_last': ('bfloat16', 'channels_last')}
TYPES = {'torch.float32': 'fp32', 'torch.bfloat16': 'bf16', 'torch.float16': 'fp16', 'torch.int32': 'i32',
         'torch.int64': 'i64'}


def record(models: list, batch_size: int, formats: list) -> list:
    """The kernel specialisations that a training and an inference step of each model launch."""
    import timm
    import torch
    import triton.language as tl

    import timm_denseres  # noqa: F401  registers the models
    from timm_denseres import _triton_head, _triton_kernels

    seen = {}

    def recording(launch):
        def launch_and_record(kernel, grid, *args, **keywords):
            parameters = inspect.signature(kernel.fn).parameters
            bound = dict(zip(parameters, args), **keywords)
            constexprs = {name: bound[name] for name, p in parameters.items() if p.annotation is tl.constexpr}
            signature = {name: 'constexpr' if name in constexprs else _type(bound[name]) for name in parameters}
            key = (kernel.fn.__name__, json.dumps(signature), json.dumps(constexprs, sort_keys=True))
            seen.setdefault(key, dict(kernel=kernel.fn.__name__, module=kernel.fn.__module__, signature=signature,
                                      constexprs=constexprs))
            return launch(kernel, grid, *args, **keywords)
        return launch_and_record

    _triton_kernels.launch = recording(_triton_kernels.launch)
    _triton_head.launch = recording(_triton_head.launch)
    for model_and_size in models:
        name, size = model_and_size.split(':')
        model = timm.create_model(name, num_classes=10)
        for dtype, memory_format in ((getattr(torch, n) for n in FORMATS[f]) for f in formats):
            x = torch.randn(batch_size, 3, int(size), int(size)).contiguous(memory_format=memory_format)
            model = model.to(memory_format=memory_format).train()
            with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
                model(x).float().square().mean().backward()
            with torch.no_grad():
                model.eval()(x)
    return list(seen.values())


def _type(value) -> str:
    import torch
    if isinstance(value, torch.Tensor):
        return '*' + TYPES[str(value.dtype)]
    if isinstance(value, bool):
        return 'i1'
    if isinstance(value, int):
        return 'i32' if abs(value) < 2 ** 31 else 'i64'
    return 'fp32'


def compile_all(specs: list, arch: int) -> list:
    """Compiles every specialisation for sm_<arch>; returns (kernel, constexprs, registers, spill bytes)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from timm_denseres._triton_tiles import COMPILE_OPTIONS  # the options every launch gives

    tools = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'
    rows = []
    for spec in specs:
        kernel = getattr(importlib.import_module(spec['module']), spec['kernel'])
        source = ASTSource(fn=kernel, signature=spec['signature'], constexprs=spec['constexprs'])
        compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32), options=COMPILE_OPTIONS)
        with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
            cubin.write(compiled.asm['cubin'])
            cubin.flush()
            usage = subprocess.run([str(tools / 'cuobjdump'), '--dump-resource-usage', cubin.name],
                                   capture_output=True, text=True, check=True).stdout
        registers = int(re.search(r'REG:(\d+)', usage).group(1))
        spills = sum(int(n) for n in re.findall(r'SPILL_(?:STORES|LOADS):(\d+)', usage))
        rows.append((spec['kernel'], spec['constexprs'], registers, spills))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', type=int, default=90, help='compute capability x 10 (90: H100, H200)')
    parser.add_argument('--models', nargs='+', default=['test_denseresnet:16', 'test_densemobilenetv2:32'],
                        metavar='NAME:SIZE', help='models and their input size (default: the test models)')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--formats', nargs='+', default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument('--record', action='store_true', help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.record:
        print(json.dumps(record(args.models, args.batch_size, args.formats)))
        return
    env = dict(os.environ, TRITON_INTERPRET='1', TIMM_DENSERES_FUSED='0',
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    child = subprocess.run([sys.executable, __file__, '--record', '--models', *args.models, '--batch-size',
                            str(args.batch_size), '--formats', *args.formats], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        sys.exit(f'recording the launches failed:\n{child.stderr}')
    specs = json.loads(child.stdout.strip().splitlines()[-1])
    os.environ.pop('TRITON_INTERPRET', None)  # the kernels for the compiler, not the interpreter
    sys.path.insert(0, str(ROOT))
    rows = compile_all(specs, args.arch)
    print(f'{len(rows)} kernel specialisations compiled for sm_{args.arch}')
    print('| kernel | constexprs | registers | spill bytes |\n|---|---|---|---|')
    for kernel, constexprs, registers, spills in rows:
        print(f'| {kernel} | {", ".join(f"{k}={v}" for k, v in constexprs.items())} | {registers} | {spills} |')


if __name__ == '__main__':
    main()
