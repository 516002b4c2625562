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
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, efficientnet_init_weights, round_channels
from timm.models._features import feature_take_indices
from timm.models.efficientnet import EfficientNet

from ._runtime import hook_free
from .fused import gate_mix
from .gate import DenseGate
from .pretrained import build_model_with_pretrained, untagged_default, warm_start_cfgs
from .resnet import PAPER, DenseStage, adjust_history, join_history, split_history

__all__ = ['DenseMobileNetV2', 'DenseInvertedResidual', 'DenseDepthwiseSeparableConv', 'make_dense_block']

# MobileNetV2 (Sandler et al. 2018, Table 2): expansion t, width c, repeats n, first stride s per stage.
MOBILENETV2_STAGES: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2_arch_def() -> List[List[str]]:
    """The stages in timm's block-string notation. The t=1 stage has no 1x1 expansion: timm builds it as a
    depthwise-separable block ('ds'), which is what timm's ``mobilenetv2_100`` does too."""
    return [[f'ds_r{n}_k3_s{s}_c{c}' if t == 1 else f'ir_r{n}_k3_s{s}_e{t}_c{c}']
            for t, c, n, s in MOBILENETV2_STAGES]


class DenseMobileBlock:
    """The dense part shared by both block types: a forward over the history list and a ``gate``.

    Mixed into subclasses of timm's blocks, which supply ``branch`` (the block without its skip). Instances are
    made from blocks that timm's builder created (see :func:`make_dense_block`), so the constructor is timm's.

    Attributes set by :func:`make_dense_block` and the model (not annotated here: TorchScript reads class
    annotations as attribute types and has none for a module): ``gate``, ``in_chs``, ``out_chs``, ``pool``
    (the block strides), ``changes_shape``, ``history_len`` (N), ``num_inbounds`` (min(N, i)) and the module
    ``mix_out`` (an identity on the block's output, for forward hooks).
    """

    def forward(self, history: List[torch.Tensor]) -> List[torch.Tensor]:
        # the history carries each output's pooled mean in front of the outputs, as DenseBasicBlock's does
        outputs, pooled = split_history(history)
        y = self.branch(outputs[-1])
        if self.changes_shape:
            # the shortcut and the earlier outputs, brought to this block's output shape, once
            outputs, pooled = adjust_history(outputs, self.in_chs, self.out_chs, self.pool)
        # inbounds, most recent first: the shortcut (x_{i-1} adjusted), then x_{i-2}, x_{i-3}, ...
        inbounds: List[torch.Tensor] = []
        inbounds_pooled: List[torch.Tensor] = []
        for k in range(1, self.num_inbounds + 1):
            inbounds.append(outputs[-k])
            inbounds_pooled.append(pooled[-k])
        # the gate looks at y before drop-path; drop-path (a per-sample scale) then applies to the mixed branch
        v, w = self.gate.weights_for(y, inbounds_pooled)
        y_mixed = self.drop_path(y)
        if not torch.jit.is_scripting():
            mixed = gate_mix(y_mixed, v, w, inbounds, relu=False, reuse_y=True) if hook_free(self.mix_out) else None
            if mixed is not None:  # the compiled kernel: the sum and the output's mean in one pass
                return join_history(outputs, pooled, mixed[0], self.history_len, mixed[1])
        out = self.mix_out(self.gate.mix(y_mixed, v, w, inbounds, reuse_y=True))
        return join_history(outputs, pooled, out, self.history_len)


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
    # the block returns the history list; this module's output is the block's own output, the point that
    # timm's forward-hook feature extraction (features_only with feature_cls='hook') needs to name
    block.mix_out = nn.Identity()
    return block


class DenseMobileNetV2(EfficientNet):
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
            device=None,
            dtype=None,
    ):
        if dense_n < 1:
            raise ValueError(f'dense_n must be at least 1 (got {dense_n}); use timm\'s mobilenetv2_100 for N=0')
        super().__init__(
            block_args=decode_arch_def(mobilenetv2_arch_def()),
            num_classes=num_classes,
            num_features=1280,
            in_chans=in_chans,
            stem_size=32,
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
        # same names (blocks.S.B); the stages now pass the history list from block to block
        self.blocks = nn.Sequential(*[DenseStage(*[make_dense_block(b) for b in stage]) for stage in self.blocks])
        for info in self.feature_info:  # a stage outputs the history list; name its last block's output instead
            stage_name = re.fullmatch(r'blocks\.(\d+)', info['module'])
            if stage_name:
                last_block = len(self.blocks[int(stage_name.group(1))]) - 1
                info['module'] = f'{info["module"]}.{last_block}.mix_out'
        self._attach_gates(self.bn1.num_features, gate_reduction, device=device, dtype=dtype)

    def _dense_blocks(self) -> List[DenseMobileBlock]:
        return [b for stage in self.blocks for b in stage]

    def _attach_gates(self, stem_chs: int, reduction: int, device=None, dtype=None) -> None:
        # Follow the history statically: per block, how many inbounds it has and which of their channels are
        # real (the rest is zero padding, left out of the softmax). A cut followed by a pad leaves zeros too.
        history_valid = [stem_chs]
        for block in self._dense_blocks():
            if block.changes_shape:
                history_valid = [min(c, block.out_chs) for c in history_valid]
            block.num_inbounds = min(self.dense_n, len(history_valid))
            block.history_len = self.dense_n
            valid = [block.out_chs] + [history_valid[-k] for k in range(2, block.num_inbounds + 1)]
            block.gate = DenseGate(block.out_chs, block.num_inbounds, reduction, valid, device=device, dtype=dtype)
            efficientnet_init_weights(block.gate)  # the same init rule as the rest of the network
            history_valid = (history_valid + [block.out_chs])[-self.dense_n:]

    @torch.jit.ignore
    def set_gates_identity(self, logit: float = 30.0) -> None:
        """Set every gate to ``v ~ 1`` with all mixing weight on the shortcut: each block then computes
        ``branch(x) + shortcut(x)``, which is timm's block where timm has a skip (stride 1, same width)."""
        for block in self._dense_blocks():
            block.gate.set_identity(logit)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.blocks:
            stage.grad_checkpointing = enable

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
        The arguments are those of :meth:`timm_denseres.resnet.DenseResNet.forward_intermediates`, and
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
        stages = self.blocks[:max_index] if stop_early else self.blocks
        history = [x]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            history = stage(history)
            if feat_idx in take_indices:
                intermediates.append(history[-1])
        if intermediates_only:
            return intermediates
        x = history[-1]
        if feat_idx == self.stage_ends[-1]:  # the head conv only follows the last stage
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
        history = [x]
        for stage in self.blocks:
            history = stage(history)
        x = self.conv_head(history[-1])
        return self.bn2(x)


def _create_densemobilenetv2(variant: str, pretrained: bool = False, **kwargs) -> DenseMobileNetV2:
    """Build a DenseMobileNetV2 variant with timm's builder (pretrained loading, features_only, cfg handling)."""
    return build_model_with_pretrained(
        DenseMobileNetV2,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    """ImageNet-1K config of timm's mobilenetv2_100 (224, crop_pct 0.875 = the paper's 256 -> 224, bicubic)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier',
        **PAPER,
        **kwargs,
    }


# `ra_in1k_warm`: timm's mobilenetv2_100.ra_in1k weights, gates at identity (approximate: see MODEL_CARD.md)
default_cfgs = untagged_default({
    **{f'densemobilenetv2_n{n}': _cfg() for n in (2, 4, 6, 8)},
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
