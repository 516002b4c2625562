"""Which kernels a device has for the gate (:meth:`timm_denseres.gate.DenseGate._backend` asks), and the switch that
turns them all off, to compare them with the formula.

A backend is a module with the same small interface: ``takes_gate(gate)`` and ``covers(y, inbounds, means)`` (what
it computes) and ``run_gate(gate, y, inbounds, means, y_mixed)`` (the block output, its mean, v and w). CPU: the
compiled C++ of ``_kernels.py`` (``TIMM_DENSERES_FUSED=0`` turns it off). CUDA: the Triton kernels of ``_triton_kernels.py`` (``TIMM_DENSERES_TRITON=0`` turns them off), and
on CPU tensors too under Triton's interpreter (``TRITON_INTERPRET=1``), where they are tested. Triton is imported
on the first call that could use it, never on a CPU-only run without the interpreter.
"""
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator, List, Optional

import torch

from . import _kernels
from ._runtime import warn_line

__all__ = ['disabled', 'kernels_disabled', 'for_device', 'triton_kernels']

_state = {'disabled': False, 'triton': None, 'checked': set()}  # triton: None until imported, then the module or
# False; checked: the devices where it ran its self-check


def _switched_on(variable: str) -> bool:
    return os.environ.get(variable, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def disabled() -> bool:
    return _state['disabled']


@contextmanager
def kernels_disabled() -> Iterator[None]:
    """Within it, the gates run their modules and the formula on every device."""
    saved = _state['disabled']
    _state['disabled'] = True
    try:
        yield
    finally:
        _state['disabled'] = saved


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def triton_kernels(device: torch.device) -> Optional[ModuleType]:
    """``_triton_kernels`` where it can run on ``device`` (CUDA, or CPU under the interpreter) and is not switched
    off; a failed import warns once (on CUDA) and is not tried again."""
    if not _switched_on('TIMM_DENSERES_TRITON'):
        return None
    if not (device.type == 'cuda' or (device.type == 'cpu' and _interpreting())):
        return None
    triton = _import_triton_kernels(device)
    if triton is None or device.type != 'cuda' or device in _state['checked']:
        return triton
    try:  # a first launch on this GPU: a kernel that cannot be compiled or run here fails here, not in a model
        triton.self_check(device)
        _state['checked'].add(device)
    except Exception as e:  # noqa: BLE001  Triton's compiler and driver raise many kinds of error
        _state['triton'] = False
        warn_line(f'timm_denseres: the Triton gate kernels do not run on {device} ({type(e).__name__}: '
                  f'{str(e).splitlines()[0] if str(e) else ""}); the gates use PyTorch operations (same numbers, '
                  f'slower). Set TIMM_DENSERES_TRITON=0 to skip the attempt.')
        return None
    return triton


def _import_triton_kernels(device: torch.device) -> Optional[ModuleType]:
    if _state['triton'] is None:
        try:
            from . import _triton_kernels
            _state['triton'] = _triton_kernels
        except ImportError as e:
            _state['triton'] = False
            if device.type == 'cuda':
                warn_line(f'timm_denseres: no Triton ({e}); the gates use PyTorch operations on CUDA (same numbers, '
                          f'slower). Install triton, or set TIMM_DENSERES_TRITON=0 to skip the attempt.')
    return _state['triton'] or None


def for_device(device: torch.device) -> List[ModuleType]:
    """The backends to ask, in order of preference."""
    backends = [_kernels] if device.type == 'cpu' and _switched_on('TIMM_DENSERES_FUSED') else []
    triton = triton_kernels(device)
    return backends + [triton] if triton is not None else backends
