"""What the current call runs under (the compiler, autocast, forward hooks): the fast eager paths of the gate
(gate.py) step aside for each of these."""
import warnings

import torch
import torch.nn as nn


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces; ``torch.compiler.is_compiling`` is missing before torch 2.3."""
    compiling = getattr(torch.compiler, 'is_compiling', None)
    return compiling is not None and compiling()


def capturing_graph() -> bool:
    """True while a graph is captured from Python, by torch.compile (dynamo) or a torch.jit trace (torch.jit.trace,
    the TorchScript ONNX exporter): the eager shortcuts step aside, so the graph records the formula."""
    return is_compiling() or torch.jit.is_tracing()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, which takes no argument before torch 2.4."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == 'cpu' else torch.is_autocast_enabled()


def hook_free(module: nn.Module) -> bool:
    """No forward hook watches ``module`` (nor all modules): a fast path may do its work without calling it."""
    return not (module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def warn_line(message: str) -> None:
    """A UserWarning shown as one line (no source line below it): the kernels' fallbacks say what happened and
    what to set, and the user's code has nothing to do with it."""
    warnings.warn_explicit(message, UserWarning, filename='timm_denseres', lineno=0)
