"""DenseResNet (Takeda, MIRU 2020) on timm's ResNet pieces, and the CIFAR ResNet-110 baseline.

Blocks are timm ``BasicBlock``s (same parameter names: ``layer1.0.conv1``, ``...downsample.0``) with a
Gate-Module added, so a timm ``resnet34`` state dict fills every shared weight of ``denseresnet34_n*``.

Block i mixes its branch with the previous N block outputs (numbered across the whole network):
``x_i = act(v * f_i(x_{i-1}) + sum_k w_ik * a_k)``. Outputs of an earlier stage are brought to the current
stage's shape once per forward (ceil-mode 2x2 avg-pool + zero channel pad) and reused by every later block;
the padding stays implied (a narrower output stays narrow, and the weighted sum skips the zero channels).
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_act_layer, get_norm_layer, to_ntuple
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, make_blocks

from ._dense import DenseBlockMixin, DenseModelMixin, DenseStage, History, attach_gates, run_stages
from .gate import DenseGate
from .pretrained import build_model_with_pretrained, imagenet_cfg, untagged_default, warm_start_cfgs

__all__ = ['DenseResNet', 'DenseBasicBlock']


class DenseBasicBlock(DenseBlockMixin, BasicBlock):
    """timm's BasicBlock whose residual add is replaced by a Gate-Module over the last N block outputs.

    Without a gate it is timm's residual block (how ``resnet110`` is built). With one, the block's final
    activation moves into the gate, which returns the block output (``gate.out_act`` is the feature point).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate: Optional[DenseGate] = None
        self.history_len = 1
        self.num_inbounds = 1
        self.in_chs = self.conv1.in_channels
        self.out_chs = self.bn2.num_features
        self.changes_shape = self.downsample is not None or self.stride != 1
        self.pool = self.stride != 1

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """f_i: conv3x3-BN-ReLU-conv3x3-BN, as in timm's BasicBlock."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        return x

    def shortcut(self, x: torch.Tensor, history: History) -> Tuple[torch.Tensor, torch.Tensor]:
        """timm's shortcut: x, or its 1x1 projection where the shape changes; and its mean."""
        if self.downsample is None:
            return history.outputs[-1], history.means[-1]
        s = self.downsample(x)
        return s, s.mean((2, 3))

    def forward(self, history: History) -> History:
        if self.gate is not None:
            return self.dense_forward(history)
        x = history.outputs[-1]
        y = self.branch(x)
        if self.drop_path is not None:
            y = self.drop_path(y)
        s = x if self.downsample is None else self.downsample(x)
        return History([self.act2(y + s)], history.means)


class DenseResNet(DenseModelMixin, nn.Module):
    """ResNet whose BasicBlocks add a gated mix of the previous ``dense_n`` block outputs.

    ``dense_n=0`` gives the plain ResNet with the same layout (used for the CIFAR ``resnet20/56/110`` baselines).

    Args:
        layers: blocks per stage.
        channels: widths of the stages.
        dense_n: N, how many earlier outputs each block mixes (0: plain ResNet).
        gate_reduction: r of the Gate-Module's hidden width.
        stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool, 64 wide) or 'cifar' (3x3 conv, BN, ReLU).
        stem_width: stem output channels.
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate, drop_block_rate, act_layer, norm_layer,
        zero_init_last: as in timm's ResNet.
        gate_init: 'shortcut' (every gate starts with fc2's weight zero and the logits of v and of the shortcut's
            weight at ``gate_init_logit``: a block starts near timm's residual block, as zero_init_last makes its
            branch start at zero) or 'pytorch' (PyTorch's init of the gate's layers, as the author's code: v ~ 0.5,
            w near uniform).
        gate_init_logit: the starting logit of 'shortcut' (3.0: v ~ 0.95, 0.87 of each softmax on the shortcut
            with 4 inbounds); None means gate_init='pytorch'.
        gate_logit_scale: the gates' learning speed: fc2's output times this is the logits (a logit moves
            ``gate_logit_scale ** 2`` times as fast under SGD); the starting gates do not depend on it.
        gate_weight_decay: False leaves every gate parameter out of weight decay (``no_weight_decay()``).
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            dense_n: int = 6,
            gate_reduction: int = 8,
            stem: str = 'imagenet',
            stem_width: int = 64,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            drop_block_rate: float = 0.0,
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            norm_layer: Union[str, Type[nn.Module]] = nn.BatchNorm2d,
            zero_init_last: bool = True,
            gate_init: str = 'shortcut',
            gate_init_logit: Optional[float] = 3.0,
            gate_logit_scale: float = 1.0,
            gate_weight_decay: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert stem in ('imagenet', 'cifar'), f'Unknown stem {stem!r}'
        assert len(layers) == len(channels) and 1 <= len(layers) <= 4, 'one to four stages'
        assert dense_n >= 0
        assert gate_init in ('shortcut', 'pytorch'), f'Unknown gate_init {gate_init!r}'
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.dense_n = dense_n
        self.gate_logit_scale = gate_logit_scale
        self.gate_weight_decay = gate_weight_decay
        self.grad_checkpointing = False
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        if stem == 'imagenet':
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False, **dd)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            stem_reduction, stage_reduction = 2, 4
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
            self.maxpool = nn.Identity()
            stem_reduction, stage_reduction = 1, 1
        self.bn1 = norm_layer(stem_width, **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=stem_width, reduction=stem_reduction, module='act1')]

        stage_modules, _ = make_blocks(
            to_ntuple(len(channels))(DenseBasicBlock), channels, layers, stem_width, act_layer=act_layer,
            norm_layer=norm_layer, drop_block_rate=drop_block_rate, drop_path_rate=drop_path_rate, **dd)
        # a stage returns the history; its feature is the last block's output, the module that timm's 'hook' and
        # 'fx' feature extractors must name: the block's activation, which a gate takes over
        last_act = 'gate.out_act' if dense_n > 0 else 'act2'
        for stage_idx, (name, stage) in enumerate(stage_modules):
            self.add_module(name, DenseStage(*stage))
            stage_reduction *= 1 if stage_idx == 0 else 2
            self.feature_info.append(dict(num_chs=channels[stage_idx], reduction=stage_reduction,
                                          module=f'{name}.{len(stage) - 1}.{last_act}'))
        # unused stages stay as empty stages so forward (and TorchScript) can name all four
        for stage_idx in range(len(stage_modules), 4):
            self.add_module(f'layer{stage_idx + 1}', DenseStage())
        self.num_stages = len(stage_modules)

        if dense_n > 0:
            attach_gates(self._stage_blocks(), stem_width, dense_n, partial(
                _make_gate, reduction=gate_reduction, act_layer=act_layer, logit_scale=gate_logit_scale, dd=dd))

        self.num_features = self.head_hidden_size = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)
        if gate_init == 'pytorch' or gate_init_logit is None:
            for block in self.dense_blocks():
                block.gate.reset_to_random()
        else:
            self.set_gates_identity(gate_init_logit)

    def dense_stages(self) -> List[DenseStage]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _stage_blocks(self) -> List[DenseBasicBlock]:
        return [block for stage in self.dense_stages() for block in stage]

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming-normal convolutions as in timm's ResNet; optionally zero the last BN of each branch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        return self.act1(x)

    def _history(self, x: torch.Tensor) -> History:
        """x_0, the stem's output after the max-pool, as the first history (with its mean if there are gates)."""
        x = self.maxpool(x)
        return History([x], [x.mean((2, 3))] if self.dense_n > 0 else [])

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stem output and each stage's output (timm's intermediates API).

        Args:
            x: input images.
            indices: take the last n features if an int, all if None, or the listed ones.
            norm: unused (no final norm), kept for the timm API.
            stop_early: stop after the last wanted feature.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.dense_stages()[:self.num_stages]
        history = run_stages(self._history(x), stages[:max_index] if stop_early else stages, take_indices,
                             intermediates)
        if intermediates_only:
            return intermediates
        return history.outputs[-1], intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) that the wanted intermediates do not need."""
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        for stage_idx in range(max_index, 4):
            setattr(self, f'layer{stage_idx + 1}', DenseStage())
        if max_index == 0:  # the stem's feature is taken before the max-pool
            self.maxpool = nn.Identity()
        self.num_stages = min(self.num_stages, max_index)
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        history = self._history(self.forward_stem(x))
        history = self.layer1(history)
        history = self.layer2(history)
        history = self.layer3(history)
        history = self.layer4(history)
        return history.outputs[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def _make_gate(block: DenseBasicBlock, valid: List[int], reduction: int, act_layer: Type[nn.Module],
               logit_scale: float, dd: Dict[str, Any]) -> DenseGate:
    """A block's gate; the block's final activation moves into it (the gate ends the block)."""
    out_act = block.act2
    del block.act2
    return DenseGate(block.out_chs, len(valid), reduction, valid, act_layer=act_layer, out_act=out_act,
                     logit_scale=logit_scale, **dd)


# The registered DenseResNets' gates: learning 100x as fast as at scale 1 under SGD, and every branch starting
# from its random init (the winner of the gate ablation, docs/fmnist_study.md). Checkpoints keep the scale they
# were trained with.
DENSE_DEFAULTS = dict(gate_logit_scale=10.0, zero_init_last=False)


def _create_denseresnet(variant: str, pretrained: bool = False, **kwargs) -> DenseResNet:
    feature_levels = len(kwargs.get('layers', (3, 4, 6, 3))) + 1  # the stem and one per stage
    dense_defaults = DENSE_DEFAULTS if kwargs.get('dense_n', 6) > 0 else None
    return build_model_with_pretrained(DenseResNet, variant, pretrained, feature_levels=feature_levels,
                                       dense_defaults=dense_defaults, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(**dict(dict(interpolation='bilinear', first_conv='conv1', classifier='fc'), **kwargs))


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR-100 config: 32x32 input, no resize or crop at test time."""
    return _cfg(**dict(dict(
        num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        mean=CIFAR100_MEAN, std=CIFAR100_STD), **kwargs))


# Tagged cfgs are checkpoints (see MODEL_CARD.md): `fmnist` ones live at timm-denseres/{model}.fmnist on the Hub;
# `a1_in1k_warm` ones are timm's resnet34.a1_in1k weights with the gates at identity. The untagged cfgs stay the
# defaults (the paper's ImageNet / CIFAR-100 set-ups), which have no weights yet.
default_cfgs = untagged_default({
    **{f'denseresnet34_n{n}': _cfg() for n in (2, 4, 6, 8)},
    **warm_start_cfgs([f'denseresnet34_n{n}' for n in (2, 4, 6, 8)], 'resnet34.a1_in1k', _cfg()),
    **{name: _cifar_cfg() for name in ('resnet20', 'denseresnet20_n2', 'denseresnet20_n4',
                                       'resnet56', 'denseresnet56_n2', 'denseresnet56_n4')},
    'resnet110': _cifar_cfg(),
    'test_denseresnet': _cifar_cfg(num_classes=10),
    **{f'denseresnet110_n{n}': _cifar_cfg() for n in (2, 4, 6, 8)},
})


def _denseresnet34(n: int, pretrained: bool, **kwargs) -> DenseResNet:
    model_args = dict(layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), dense_n=n, gate_reduction=8)
    return _create_denseresnet(f'denseresnet34_n{n}', pretrained, **dict(model_args, **kwargs))


def _cifar_resnet(variant: str, depth: int, n: int, pretrained: bool, **kwargs) -> DenseResNet:
    # num_classes comes from the cfg (100 for the untagged CIFAR-100 cfg, 10 for `.fmnist`), as in_chans does
    blocks = (depth - 2) // 6
    model_args = dict(
        layers=(blocks,) * 3, channels=(16, 32, 64), stem='cifar', stem_width=16, dense_n=n, gate_reduction=2)
    return _create_denseresnet(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def denseresnet34_n2(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-34, N=2 (ImageNet layout of timm's resnet34 with a Gate-Module in every block)."""
    return _denseresnet34(2, pretrained, **kwargs)


@register_model
def denseresnet34_n4(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-34, N=4."""
    return _denseresnet34(4, pretrained, **kwargs)


@register_model
def denseresnet34_n6(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-34, N=6 (the paper's best ImageNet model)."""
    return _denseresnet34(6, pretrained, **kwargs)


@register_model
def denseresnet34_n8(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-34, N=8."""
    return _denseresnet34(8, pretrained, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs) -> DenseResNet:
    """CIFAR ResNet-110 baseline (3x3 stem, 3 x 18 BasicBlocks, 16/32/64 wide, 1x1 conv projections)."""
    return _cifar_resnet('resnet110', 110, 0, pretrained, **kwargs)


@register_model
def denseresnet110_n2(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-110 (CIFAR), N=2."""
    return _cifar_resnet('denseresnet110_n2', 110, 2, pretrained, **kwargs)


@register_model
def denseresnet110_n4(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-110 (CIFAR), N=4 (the paper's best CIFAR-100 model)."""
    return _cifar_resnet('denseresnet110_n4', 110, 4, pretrained, **kwargs)


@register_model
def denseresnet110_n6(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-110 (CIFAR), N=6."""
    return _cifar_resnet('denseresnet110_n6', 110, 6, pretrained, **kwargs)


@register_model
def denseresnet110_n8(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-110 (CIFAR), N=8."""
    return _cifar_resnet('denseresnet110_n8', 110, 8, pretrained, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> DenseResNet:
    """CIFAR ResNet-20 baseline (3 x 3 BasicBlocks); not in the paper, sized for CPU studies."""
    return _cifar_resnet('resnet20', 20, 0, pretrained, **kwargs)


@register_model
def denseresnet20_n2(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-20 (CIFAR), N=2; not in the paper."""
    return _cifar_resnet('denseresnet20_n2', 20, 2, pretrained, **kwargs)


@register_model
def denseresnet20_n4(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-20 (CIFAR), N=4; not in the paper."""
    return _cifar_resnet('denseresnet20_n4', 20, 4, pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> DenseResNet:
    """CIFAR ResNet-56 baseline (3 x 9 BasicBlocks); not in the paper."""
    return _cifar_resnet('resnet56', 56, 0, pretrained, **kwargs)


@register_model
def denseresnet56_n2(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-56 (CIFAR), N=2; not in the paper."""
    return _cifar_resnet('denseresnet56_n2', 56, 2, pretrained, **kwargs)


@register_model
def denseresnet56_n4(pretrained: bool = False, **kwargs) -> DenseResNet:
    """DenseResNet-56 (CIFAR), N=4; not in the paper."""
    return _cifar_resnet('denseresnet56_n4', 56, 4, pretrained, **kwargs)


@register_model
def test_denseresnet(pretrained: bool = False, **kwargs) -> DenseResNet:
    """A tiny DenseResNet for tests (CIFAR layout, 2 blocks per stage, 8/16/32 wide, N=3)."""
    model_args = dict(layers=(2, 2, 2), channels=(8, 16, 32), stem='cifar', stem_width=8, dense_n=3, gate_reduction=2)
    return _create_denseresnet('test_denseresnet', pretrained, **dict(model_args, **kwargs))
