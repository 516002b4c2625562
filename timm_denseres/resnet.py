"""DenseResNet (Takeda, MIRU 2020) on timm's ResNet pieces, and the CIFAR ResNet-110 baseline.

Blocks are timm ``BasicBlock``s (same parameter names: ``layer1.0.conv1``, ``...downsample.0``) with a
Gate-Module added, so a timm ``resnet34`` state dict fills every shared weight of ``denseresnet34_n*``.

Block i mixes its branch with the previous N block outputs (numbered across the whole network):
``x_i = act(v * f_i(x_{i-1}) + sum_k w_ik * a_k)``. Outputs of an earlier stage are brought to the current
stage's shape once per forward (ceil-mode 2x2 avg-pool + zero channel pad) and reused by every later block;
the padding stays implied (a narrower output stays narrow, and the weighted sum skips the zero channels).
"""
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_act_layer, get_norm_layer, to_ntuple
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, make_blocks
from torch.utils.checkpoint import checkpoint

from ._runtime import hook_free
from .fused import gate_mix
from .gate import DenseGate, adjust_inbound, global_avg_pool, pad_channels
from .pretrained import FASHION_MNIST, build_model_with_pretrained, hub_cfgs, untagged_default, warm_start_cfgs

__all__ = ['DenseResNet', 'DenseBasicBlock']


class DenseBasicBlock(BasicBlock):
    """timm's BasicBlock whose residual add is replaced by a Gate-Module over the last N block outputs.

    The block maps the history of the last n block outputs ``[x_{i-n}, ..., x_{i-1}]`` (oldest first, already in
    the previous block's output shape) to the new history ``[..., x_{i-1}', x_i]`` with at most ``history_len``
    outputs. When the block changes the shape (stride or width), the history is adjusted to the new shape here,
    once, and passed on. Without a gate it is a plain residual block, which is how ``resnet110`` is built.

    The gate needs the global average of every inbound, and each output is an inbound of N blocks; so a dense
    block passes each output's pooled (B, C, 1, 1) mean along, in front of the outputs:
    ``[p_{i-n}, ..., p_{i-1}, x_{i-n}, ..., x_{i-1}]``. The first block gets the bare ``[x_0]``, and
    ``history[-1]`` is always the latest output.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate: Optional[DenseGate] = None
        self.history_len = 1
        self.num_inbounds = 1
        self.in_chs = self.conv1.in_channels
        self.out_chs = self.bn2.num_features
        self.changes_shape = self.downsample is not None or self.stride != 1
        self.pool_history = self.stride != 1

    def attach_gate(
            self,
            history_len: int,
            num_inbounds: int,
            reduction: int,
            valid_channels: List[int],
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        """Turn the block dense: mix the shortcut and ``num_inbounds - 1`` earlier outputs, keep ``history_len``."""
        self.history_len = history_len
        self.num_inbounds = num_inbounds
        self.gate = DenseGate(
            self.out_chs, num_inbounds, reduction, valid_channels, act_layer=act_layer, device=device, dtype=dtype)

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

    def forward(self, history: List[torch.Tensor]) -> List[torch.Tensor]:
        x = history[-1]
        y = self.branch(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.drop_path is not None:
            y_mixed = self.drop_path(y)
        else:
            y_mixed = y
        gate = self.gate
        if gate is None:
            return [self.act2(y_mixed + shortcut)]

        outputs, pooled = split_history(history)
        if self.changes_shape:
            outputs, pooled = adjust_history(outputs, self.in_chs, self.out_chs, self.pool_history)
        # inbounds: the shortcut replaces x_{i-1}, then x_{i-2}, x_{i-3}, ... (most recent first)
        inbounds = [shortcut]
        inbounds_pooled = [pooled[-1] if self.downsample is None else global_avg_pool(shortcut)]
        for k in range(2, self.num_inbounds + 1):
            inbounds.append(outputs[-k])
            inbounds_pooled.append(pooled[-k])
        # the gate looks at y before drop-path; drop-path (a per-sample scale) then applies to the mixed branch
        v, w = gate.weights_for(y, inbounds_pooled)
        if not torch.jit.is_scripting():
            plain_relu = type(self.act2) is nn.ReLU and hook_free(self.act2)
            mixed = gate_mix(y_mixed, v, w, inbounds, relu=True, reuse_y=True) if plain_relu else None
            if mixed is not None:  # the compiled kernel: sum, ReLU and the output's mean in one pass
                return join_history(outputs, pooled, mixed[0], self.history_len, mixed[1])
        out = self.act2(gate.mix(y_mixed, v, w, inbounds, reuse_y=True))
        return join_history(outputs, pooled, out, self.history_len)


def split_history(history: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """A dense block's input ``[p_{i-n}, ..., p_{i-1}, x_{i-n}, ..., x_{i-1}]`` as (outputs, their pooled means).
    The first block gets the bare ``[x_0]``, whose mean is taken here."""
    if len(history) == 1:
        return history, [global_avg_pool(history[0])]
    half = len(history) // 2
    return history[half:], history[:half]


def adjust_history(
        outputs: List[torch.Tensor], in_chs: int, out_chs: int, pool: bool,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The outputs brought to a block's new shape (:func:`adjust_inbound`), once, and their means. Outputs
    narrower than the block stay narrow (their zero padding is implied: the mix skips it); their means are
    padded, since the gate reads all channels."""
    outputs = [adjust_inbound(h, in_chs, out_chs, pool, pad=False) for h in outputs]
    return outputs, [pad_channels(global_avg_pool(h), out_chs) for h in outputs]


torch.fx.wrap('pad_channels')  # reads the width of its input; a leaf for torch.fx


def join_history(
        outputs: List[torch.Tensor], pooled: List[torch.Tensor], out: torch.Tensor, history_len: int,
        out_pooled: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """The next block's input: the last ``history_len`` outputs (``out`` the latest), their means in front, so
    that every output is pooled once (``out_pooled``: out's mean, where the caller has it already). New lists: the
    caller's history must stay intact (activation checkpointing re-runs a block)."""
    outputs = (outputs + [out])[-history_len:]
    if out_pooled is None:
        out_pooled = global_avg_pool(out)
    pooled = (pooled + [out_pooled])[-history_len:]
    return pooled + outputs


@contextmanager
def _keep_norm_stats(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of ``module`` on exit: checkpointing re-runs a block's forward
    in backward, which would otherwise update them (and ``num_batches_tracked``) a second time per step."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _checkpoint_contexts(block: nn.Module) -> Tuple[ContextManager, ContextManager]:
    return nullcontext(), _keep_norm_stats(block)  # (forward, recompute)


class DenseStage(nn.Sequential):
    """A stage of dense blocks: passes the history list from block to block (blocks keep timm's names)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, history: List[torch.Tensor]) -> List[torch.Tensor]:
        for block in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                history = checkpoint(
                    block, history, use_reentrant=False, context_fn=partial(_checkpoint_contexts, block))
            else:
                history = block(history)
        return history


class DenseResNet(nn.Module):
    """ResNet whose BasicBlocks add a gated mix of the previous ``dense_n`` block outputs.

    ``dense_n=0`` gives the plain ResNet with the same layout (used for the CIFAR ``resnet110`` baseline).

    Args:
        layers: blocks per stage.
        channels: widths of the stages.
        dense_n: N, how many earlier outputs each block mixes (0: plain ResNet).
        gate_reduction: r of the Gate-Module's hidden width.
        stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool, 64 wide) or 'cifar' (3x3 conv, BN, ReLU).
        stem_width: stem output channels.
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate, drop_block_rate, act_layer, norm_layer,
        zero_init_last: as in timm's ResNet.
        gate_init_logit: None leaves the gates at PyTorch's default init (v ~ 0.5, w near uniform); a float
            starts every gate with fc2's weight zero and v's and the shortcut's logits at this value.
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
            gate_init_logit: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert stem in ('imagenet', 'cifar'), f'Unknown stem {stem!r}'
        assert len(layers) == len(channels) and 1 <= len(layers) <= 4, 'one to four stages'
        assert dense_n >= 0
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.dense_n = dense_n
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
            to_ntuple(len(channels))(DenseBasicBlock),
            channels,
            layers,
            stem_width,
            act_layer=act_layer,
            norm_layer=norm_layer,
            drop_block_rate=drop_block_rate,
            drop_path_rate=drop_path_rate,
            **dd,
        )
        for stage_idx, (name, stage) in enumerate(stage_modules):
            self.add_module(name, DenseStage(*stage))
            stage_reduction *= 1 if stage_idx == 0 else 2
            # a stage returns the history list; its feature is the output of the last block's final activation,
            # the module that timm's 'hook' (forward hook) and 'fx' (graph node) feature extractors must name
            self.feature_info.append(dict(
                num_chs=channels[stage_idx], reduction=stage_reduction, module=f'{name}.{len(stage) - 1}.act2'))
        # unused stages stay as empty Sequentials so forward (and TorchScript) can name all four
        for stage_idx in range(len(stage_modules), 4):
            self.add_module(f'layer{stage_idx + 1}', DenseStage())
        self.num_stages = len(stage_modules)

        if dense_n > 0:
            self._attach_gates(stem_width, gate_reduction, act_layer, **dd)

        self.num_features = self.head_hidden_size = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)
        if gate_init_logit is not None:
            self.set_gates_identity(gate_init_logit)

    def _blocks(self) -> List[DenseBasicBlock]:
        return [b for s in (self.layer1, self.layer2, self.layer3, self.layer4) for b in s]

    def _attach_gates(self, stem_width: int, reduction: int, act_layer: Type[nn.Module], **dd) -> None:
        # Follow the history statically to know, per block, how many inbounds it has and which of their
        # channels are real (the rest is zero padding, left out of the softmax).
        history_valid = [stem_width]
        for block in self._blocks():
            if block.changes_shape:
                history_valid = [min(c, block.out_chs) for c in history_valid]
            num_inbounds = min(self.dense_n, len(history_valid))
            valid = [block.out_chs] + [history_valid[-k] for k in range(2, num_inbounds + 1)]
            block.attach_gate(self.dense_n, num_inbounds, reduction, valid, act_layer=act_layer, **dd)
            history_valid = (history_valid + [block.out_chs])[-self.dense_n:]

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
    def set_gates_identity(self, logit: float = 30.0) -> None:
        """Set every gate to ``v ~ 1`` with all mixing weight on the shortcut: the network becomes the ResNet
        with the same shared weights (exactly, to float32 resolution, at the default logit)."""
        for block in self._blocks():
            if block.gate is not None:
                block.gate.set_identity(logit)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        return self.act1(x)

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
        num_features = self.num_stages + 1
        take_indices, max_index = feature_take_indices(num_features, indices)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        history = [self.maxpool(x)]
        stages = [self.layer1, self.layer2, self.layer3, self.layer4][:self.num_stages]
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            history = stage(history)
            if feat_idx in take_indices:
                intermediates.append(history[-1])
        if intermediates_only:
            return intermediates
        return history[-1], intermediates

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
        self.num_stages = min(self.num_stages, max_index)
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        history = [self.maxpool(x)]
        history = self.layer1(history)
        history = self.layer2(history)
        history = self.layer3(history)
        history = self.layer4(history)
        return history[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def _create_denseresnet(variant: str, pretrained: bool = False, **kwargs) -> DenseResNet:
    """Build a DenseResNet variant with timm's builder (pretrained loading, features_only, cfg handling), through
    the checked pretrained loading of ``pretrained.py`` (checksums, warm starts, clear errors)."""
    num_features = len(kwargs.get('layers', (3, 4, 6, 3))) + 1  # stem + one per stage
    return build_model_with_pretrained(
        DenseResNet,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_features))),
        **kwargs,
    )


PAPER = dict(
    paper_ids='MIRU2020',
    paper_name='Dense Residual Networks for Image Classification (Takeda, MIRU 2020)',
    license='apache-2.0',
)


def _cfg(**kwargs) -> Dict[str, Any]:
    """ImageNet-1K config; test crop follows the paper (short side 256, centre 224 -> crop_pct 0.875)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **PAPER,
        **kwargs,
    }


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR-100 config: 32x32 input, no resize or crop at test time."""
    return _cfg(
        num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        mean=CIFAR100_MEAN, std=CIFAR100_STD, **kwargs)


def _fmnist_cfg(**kwargs) -> Dict[str, Any]:
    """Fashion-MNIST config of the CIFAR-layout models: 1x28x28 input, 10 classes, 7x7 final feature map."""
    return _cfg(**dict(FASHION_MNIST, pool_size=(7, 7), **kwargs))


# Tagged cfgs are checkpoints (see MODEL_CARD.md): `fmnist` ones live at timm-denseres/{model}.fmnist on the Hub;
# `a1_in1k_warm` ones are timm's resnet34.a1_in1k weights with the gates at identity. The untagged cfgs stay the
# defaults (the paper's ImageNet / CIFAR-100 set-ups), which have no weights yet.
default_cfgs = untagged_default({
    **{f'denseresnet34_n{n}': _cfg() for n in (2, 4, 6, 8)},
    **warm_start_cfgs([f'denseresnet34_n{n}' for n in (2, 4, 6, 8)], 'resnet34.a1_in1k', _cfg()),
    **{name: _cifar_cfg() for name in ('resnet20', 'denseresnet20_n2', 'denseresnet20_n4',
                                       'resnet56', 'denseresnet56_n2', 'denseresnet56_n4')},
    'resnet110': _cifar_cfg(),
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
