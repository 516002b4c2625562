"""Small shared helpers for the tests: which models the plugin registers, inputs sized for them, and gates and
modules with random (non-trivial) weights."""
import math
from typing import List, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg_value, model_entrypoint

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.gate import DenseGate

PLUGIN_PACKAGE = 'timm_denseres'


def plugin_model_names() -> List[str]:
    """Every model in timm's registry whose entrypoint lives in this package, so a new family (module) that
    registers models joins every parametrized test without a list to update."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(PLUGIN_PACKAGE))


def model_family(name: str) -> str:
    """The module that registered a model, e.g. ``timm_denseres.resnet``."""
    return model_entrypoint(name).__module__


def cfg_input_size(name: str) -> Tuple[int, int, int]:
    return tuple(get_pretrained_cfg_value(name, 'input_size'))


def is_small_input_model(name: str) -> bool:
    """CIFAR-style models (32 px default input) as opposed to ImageNet-style ones."""
    return max(cfg_input_size(name)[1:]) <= 64


def small_size(name: str) -> int:
    """A small square input that still runs every stage with more than one pixel: the default size for
    CIFAR models (32), 64 for ImageNet models (last stage 2x2 at reduction 32)."""
    return min(max(cfg_input_size(name)[1:]), 64)


def odd_sizes(name: str) -> Tuple[int, ...]:
    """Sizes that are not multiples of the network's reduction, so every stride-2 layer sees odd inputs."""
    return (33, 27) if is_small_input_model(name) else (97, 225, 33)


def make_input(batch: int, size: int, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(seed))


def reduced(size: int, reduction: int) -> int:
    """Spatial size after ``reduction``: every stride-2 layer pads so that it rounds up."""
    return math.ceil(size / reduction)


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BatchNorm affine parameters and statistics (seeded), returned in eval mode: the default init zeroes
    the last BN of each branch, which would make branches vanish and comparisons trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial weights and BN statistics everywhere (the default init zeroes the last BN of each branch)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.3 if p.dim() == 1 else 0.1))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)


def make_gate(channels: int, valid: List[int], reduction: int, seed: int) -> DenseGate:
    """A DenseGate with :func:`randomise`'s weights and statistics; ``valid``: each inbound's real channels."""
    torch.manual_seed(seed)
    gate = DenseGate(channels, len(valid), reduction, valid)
    randomise(gate, seed)
    return gate
