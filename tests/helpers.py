"""Small shared helpers for the tests: which models the plugin registers, inputs sized for them, and gates and
modules with random (non-trivial) weights."""
import math
from typing import List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import get_pretrained_cfg_value, model_entrypoint
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.gate import DenseGate

PLUGIN_PACKAGE = 'timm_denseres'


def plugin_model_names() -> List[str]:
    """Every model in timm's registry whose entrypoint lives in this package, so a new family (module) that
    registers models joins every parametrized test without a list to update."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(PLUGIN_PACKAGE))


def model_family(name: str) -> str:
    """The module that registered a model, e.g. ``timm_denseres.denseresnet``."""
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


def randomise(module: nn.Module, seed: int, weight_noise: Optional[float] = None) -> nn.Module:
    """Non-trivial weights, seeded: every weight and bias moved off its init, and each BatchNorm given random
    statistics and an affine scale below one, so that deep random networks stay well-conditioned. (The default
    init zeroes the last BN of each branch, which would make branches vanish and comparisons trivial.)
    ``weight_noise``: the spread of the weights' noise, instead of half their own (a single layer can take more)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        norm_params = {id(p) for m in norms for p in (m.weight, m.bias) if p is not None}
        for p in module.parameters():  # weights by half their spread (deep networks stay bounded), biases by 0.1
            if id(p) not in norm_params:
                scale = (0.5 * p.std().item() if weight_noise is None else weight_noise) if p.dim() > 1 else 0.1
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.25)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def make_gate(channels: int, valid: List[int], reduction: int, seed: int, relu: bool = False) -> DenseGate:
    """A DenseGate with :func:`randomise`'s weights; ``valid``: each inbound's real channels; ``relu``: a ReLU
    after the mix (as a DenseResNet block), else none (as a DenseMobileNetV2 block)."""
    torch.manual_seed(seed)
    gate = DenseGate(channels, len(valid), reduction, valid, out_act=nn.ReLU() if relu else None)
    return randomise(gate, seed, weight_noise=0.1)


def zero_branches(model: nn.Module) -> nn.Module:
    """Every dense block's branch output zero (its last BatchNorm's weight and bias): the identity path alone."""
    for block in model.dense_blocks():
        last_bn = block.bn2 if hasattr(block, 'downsample') else block.bn3 if hasattr(block, 'bn3') else block.bn2
        nn.init.zeros_(last_bn.weight)
        nn.init.zeros_(last_bn.bias)
    return model


def reference_adjust(x: torch.Tensor, channels: int, pool: bool) -> torch.Tensor:
    """An earlier block output in a block's shape, as the paper says it: ceil-mode 2x2 average pool if the block
    strides, then zero-padded or cut to ``channels``."""
    if pool:
        x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    if x.shape[1] < channels:
        x = torch.cat([x, x.new_zeros(x.shape[0], channels - x.shape[1], x.shape[2], x.shape[3])], dim=1)
    return x[:, :channels]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fx_feature_model(model: nn.Module) -> nn.Module:
    """The model traced by torch.fx as timm's feature extraction traces it, returning its last node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, [eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
