"""DenseMobileNetV2 (Takeda, MIRU 2020) on timm's MobileNetV2: timm's EfficientNet builder and block classes.

timm builds the network exactly as for ``mobilenetv2_100`` (same parameter names: ``conv_stem``, ``bn1``,
``blocks.S.B.conv_pw`` ..., ``conv_head``, ``bn2``, ``classifier``), so a timm ``mobilenetv2_100`` state dict
fills every shared weight. Then every block is made dense: it gets a parameter-free shortcut (ceil-mode 2x2
avg-pool where it strides, channel zero-pad or cut where its width changes) and a Gate-Module ``gate`` that mixes
its branch with the shortcut and the previous N-1 block outputs, with no activation after the mix (r = 4).

Block i maps the history ``[x_{i-n}, ..., x_{i-1}]`` (x_0 the stem output) to ``[..., x_i]``. Where a block
changes the shape, the whole history is brought to the new shape once (pool, pad/cut), so every entry carries the
same parameter-free image of x_0 and the identity path of the paper (eq. 2-5) holds exactly (the zero padding
stays implied: a narrower entry stays narrow, and the weighted sum skips its zero channels). (So the 32-channel
stem output is cut to 16 channels by block 1 and later blocks see it zero-padded from there, rather than cut
from the stem output directly: that would give x_0 channels that the shortcuts do not carry and break the
identity path.)
"""
import re
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, efficientnet_init_weights, round_channels
from timm.models._features import feature_take_indices
from timm.models.efficientnet import EfficientNet

from ._dense import DenseBlockMixin, DenseModelMixin, DenseStage, History, attach_gates, run_stages
from .gate import DenseGate
from .pretrained import build_model_with_pretrained, imagenet_cfg, untagged_default, warm_start_cfgs

__all__ = ['DenseMobileNetV2', 'DenseInvertedResidual', 'DenseDepthwiseSeparableConv', 'make_dense_block']

# MobileNetV2 (Sandler et al. 2018, Table 2): expansion t, width c, repeats n, first stride s per stage.
MOBILENETV2_STAGES: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2_arch_def(stages: Tuple[Tuple[int, int, int, int], ...] = MOBILENETV2_STAGES) -> List[List[str]]:
    """The stages in timm's block-string notation. The t=1 stage has no 1x1 expansion: timm builds it as a
    depthwise-separable block ('ds'), which is what timm's ``mobilenetv2_100`` does too."""
    return [[f'ds_r{n}_k3_s{s}_c{c}' if t == 1 else f'ir_r{n}_k3_s{s}_e{t}_c{c}']
            for t, c, n, s in stages]


class DenseMobileBlock(DenseBlockMixin):
    """The dense part shared by both block types: the shortcut is x_{i-1} brought to the block's shape (pooled
    where it strides, channels cut or implied-padded where the width changes), with no activation after the mix.

    Instances are made from blocks that timm's builder created (see :func:`make_dense_block`), so the constructor
    is timm's; :func:`make_dense_block` sets ``in_chs``, ``out_chs``, ``pool`` and ``changes_shape``, and
    :func:`timm_denseres._dense.attach_gates` the gate. (Not annotated here: TorchScript reads class annotations
    as attribute types and has none for a module.)
    """

    def shortcut(self, x: torch.Tensor, history: History) -> Tuple[torch.Tensor, torch.Tensor]:
        return history.outputs[-1], history.means[-1]

    def forward(self, history: History) -> History:
        return self.dense_forward(history)


class DenseInvertedResidual(DenseMobileBlock, InvertedResidual):
    """timm's InvertedResidual with a Gate-Module over the last N outputs instead of its optional skip."""

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """conv1x1 expand-BN-ReLU6-dwconv3x3-BN-ReLU6-conv1x1 project-BN, as in timm's InvertedResidual."""
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        return self.bn3(x)


class DenseDepthwiseSeparableConv(DenseMobileBlock, DepthwiseSeparableConv):
    """timm's DepthwiseSeparableConv (MobileNetV2's first block, t=1) with a Gate-Module instead of a skip."""

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """dwconv3x3-BN-ReLU6-conv1x1-BN, as in timm's DepthwiseSeparableConv."""
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        return self.bn2(x)


_DENSE_CLASSES: Dict[type, type] = {
    InvertedResidual: DenseInvertedResidual,
    DepthwiseSeparableConv: DenseDepthwiseSeparableConv,
}


def make_dense_block(block: nn.Module) -> nn.Module:
    """Turn a block built by timm's EfficientNetBuilder into its dense subclass, in place.

    timm's builder picks the block class itself, so the block is built by timm (every argument, the parameter
    names and their init stay timm's) and then given the dense class, the way ``torch.nn.utils.parametrize``
    swaps a module's class. The dense classes add methods only; :meth:`DenseMobileNetV2._attach_gates` adds the
    gate and the static shape facts.
    """
    dense_cls = _DENSE_CLASSES.get(type(block))
    if dense_cls is None:
        raise ValueError(f'No dense version of {type(block).__name__}; only MobileNetV2 blocks are supported')
    if block.conv_s2d is not None or not isinstance(block.aa, nn.Identity):
        raise ValueError('space-to-depth and anti-aliased blocks are not supported by DenseMobileNetV2')
    block.__class__ = dense_cls
    if isinstance(block, DenseInvertedResidual):
        block.in_chs, block.out_chs = block.conv_pw.in_channels, block.conv_pwl.out_channels
    else:
        block.in_chs, block.out_chs = block.conv_dw.in_channels, block.conv_pw.out_channels
    block.pool = block.conv_dw.stride[0] > 1
    block.changes_shape = block.pool or block.in_chs != block.out_chs
    return block


class DenseMobileNetV2(DenseModelMixin, EfficientNet):
    """MobileNetV2 (timm's ``mobilenetv2_100``) whose 17 blocks each mix the previous ``dense_n`` block outputs.

    Args:
        dense_n: N, how many earlier outputs each block mixes (the shortcut counts as one), at least 1.
        gate_reduction: r of the Gate-Module's hidden width.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input image channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over the blocks (timm's builder rule).
        global_pool: pooling type of the head.
        output_stride: 32, 16 or 8; later strides become dilations (timm's builder) and the shortcuts stop pooling.
        stages: (expansion t, width c, repeats n, first stride s) per stage; MobileNetV2's by default.
        stem_size, num_features: widths of the stem and of the head conv.
        gate_logit_scale, gate_weight_decay: as in :class:`~timm_denseres.denseresnet.DenseResNet` (the gates
            start at timm's EfficientNet init, fc2's divided by the scale).
    """

    def __init__(
            self,
            dense_n: int = 4,
            gate_reduction: int = 4,
            num_classes: int = 1000,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            global_pool: str = 'avg',
            output_stride: int = 32,
            stages: Tuple[Tuple[int, int, int, int], ...] = MOBILENETV2_STAGES,
            stem_size: int = 32,
            num_features: int = 1280,
            gate_logit_scale: float = 1.0,
            gate_weight_decay: bool = True,
            device=None,
            dtype=None,
    ):
        if dense_n < 1:
            raise ValueError(f'dense_n must be at least 1 (got {dense_n}); use timm\'s mobilenetv2_100 for N=0')
        super().__init__(
            block_args=decode_arch_def(mobilenetv2_arch_def(stages)),
            num_classes=num_classes,
            num_features=num_features,
            in_chans=in_chans,
            stem_size=stem_size,
            output_stride=output_stride,
            act_layer=get_act_layer('relu6'),
            norm_layer=nn.BatchNorm2d,
            round_chs_fn=round_channels,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            global_pool=global_pool,
            device=device,
            dtype=dtype,
        )
        self.dense_n = dense_n
        self.gate_logit_scale = gate_logit_scale
        self.gate_weight_decay = gate_weight_decay
        # same names (blocks.S.B); the stages now pass the history list from block to block
        # a ModuleList, not timm's Sequential: the stages pass a history, which Sequential.forward cannot type
        self.blocks = nn.ModuleList([DenseStage(*[make_dense_block(b) for b in stage]) for stage in self.blocks])
        for info in self.feature_info:  # a stage outputs the history; name its last block's output instead
            stage_name = re.fullmatch(r'blocks\.(\d+)', info['module'])
            if stage_name:
                last_block = len(self.blocks[int(stage_name.group(1))]) - 1
                info['module'] = f'{info["module"]}.{last_block}.gate.out_act'
        attach_gates([b for stage in self.blocks for b in stage], self.bn1.num_features, dense_n, partial(
            _make_gate, reduction=gate_reduction, logit_scale=gate_logit_scale, dd=dict(device=device, dtype=dtype)))

    def dense_stages(self) -> List[DenseStage]:
        return list(self.blocks)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'classifier' if name_only else self.classifier

    def as_sequential(self) -> nn.Sequential:
        raise NotImplementedError('DenseMobileNetV2 blocks pass a history list, not a tensor; no sequential form')

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            extra_blocks: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the feature_info features (timm's intermediates API, as EfficientNet's).
        The arguments are those of :meth:`timm_denseres.denseresnet.DenseResNet.forward_intermediates`, and
        ``extra_blocks``: index the stem and every stage output instead of the feature_info features."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        if extra_blocks:
            take_indices, max_index = feature_take_indices(len(self.blocks) + 1, indices)
        else:
            take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
            take_indices = [self.stage_ends[i] for i in take_indices]
            max_index = self.stage_ends[max_index]
        intermediates = []
        x = self.bn1(self.conv_stem(x))
        if 0 in take_indices:
            intermediates.append(x)
        stages = list(self.blocks[:max_index] if stop_early else self.blocks)
        history = run_stages(History([x], [x.mean((2, 3))]), stages, take_indices, intermediates)
        if intermediates_only:
            return intermediates
        x = history.outputs[-1]
        if len(stages) == self.stage_ends[-1]:  # the head conv only follows the last stage
            x = self.bn2(self.conv_head(x))
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
            extra_blocks: bool = False,
    ) -> List[int]:
        """Drop the stages (and head) that the wanted intermediates do not need."""
        if extra_blocks:
            take_indices, max_index = feature_take_indices(len(self.blocks) + 1, indices)
        else:
            take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
            max_index = self.stage_ends[max_index]
        if prune_norm or max_index < len(self.blocks):
            self.conv_head = nn.Identity()
            self.bn2 = nn.Identity()
        self.blocks = self.blocks[:max_index]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_stem(x)
        x = self.bn1(x)
        history = History([x], [x.mean((2, 3))])
        for stage in self.blocks:
            history = stage(history)
        x = self.conv_head(history.outputs[-1])
        return self.bn2(x)


def _make_gate(block: DenseMobileBlock, valid: List[int], reduction: int, logit_scale: float,
               dd: Dict[str, Any]) -> DenseGate:
    gate = DenseGate(block.out_chs, len(valid), reduction, valid, logit_scale=logit_scale, **dd)
    efficientnet_init_weights(gate)  # the same init rule as the rest of the network
    with torch.no_grad():  # the same first logits whatever the scale
        gate.fc2.weight.div_(logit_scale)
        gate.fc2.bias.div_(logit_scale)
    return gate


def _create_densemobilenetv2(variant: str, pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    stages = kwargs.get('stages', MOBILENETV2_STAGES)
    feature_levels = 1 + sum(1 for _, _, _, stride in stages if stride > 1)  # one per resolution, the stem's too
    # the gates keep scale 1 by default (the ablation ran on DenseResNets); a checkpoint keeps its own
    return build_model_with_pretrained(DenseMobileNetV2, variant, pretrained, feature_levels=feature_levels,
                                       dense_defaults={}, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """timm's mobilenetv2_100 set-up (bicubic)."""
    return imagenet_cfg(**dict(dict(interpolation='bicubic', first_conv='conv_stem', classifier='classifier'),
                               **kwargs))


# `ra_in1k_warm`: timm's mobilenetv2_100.ra_in1k weights, gates at identity (approximate: see MODEL_CARD.md)
default_cfgs = untagged_default({
    **{f'densemobilenetv2_n{n}': _cfg() for n in (2, 4, 6, 8)},
    'test_densemobilenetv2': _cfg(input_size=(3, 64, 64), pool_size=(8, 8), num_classes=10),
    **warm_start_cfgs([f'densemobilenetv2_n{n}' for n in (2, 4, 6, 8)], 'mobilenetv2_100.ra_in1k', _cfg(),
                      exact=False),
})


def _densemobilenetv2(n: int, pretrained: bool, **kwargs) -> DenseMobileNetV2:
    model_args = dict(dense_n=n, gate_reduction=4)
    return _create_densemobilenetv2(f'densemobilenetv2_n{n}', pretrained, **dict(model_args, **kwargs))


@register_model
def densemobilenetv2_n2(pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    """DenseMobileNetV2, N=2 (timm's mobilenetv2_100 with a Gate-Module in every block)."""
    return _densemobilenetv2(2, pretrained, **kwargs)


@register_model
def densemobilenetv2_n4(pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    """DenseMobileNetV2, N=4 (the paper's model)."""
    return _densemobilenetv2(4, pretrained, **kwargs)


@register_model
def densemobilenetv2_n6(pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    """DenseMobileNetV2, N=6."""
    return _densemobilenetv2(6, pretrained, **kwargs)


@register_model
def densemobilenetv2_n8(pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    """DenseMobileNetV2, N=8."""
    return _densemobilenetv2(8, pretrained, **kwargs)


@register_model
def test_densemobilenetv2(pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    """A tiny DenseMobileNetV2 for tests (three stages, N=3, 64 px input)."""
    model_args = dict(dense_n=3, gate_reduction=4, stages=((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2)), stem_size=8,
                      num_features=64)
    return _create_densemobilenetv2('test_densemobilenetv2', pretrained, **dict(model_args, **kwargs))
