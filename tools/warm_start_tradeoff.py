"""The warm-start gate logit trade-off: how exactly the dense model starts as its base, and how fast its gates move.

    python tools/warm_start_tradeoff.py --scales 1 10   # a few minutes on one CPU core

A warm start sets every gate to v = sigmoid(L), all softmax weight but ~e^-L on the shortcut. For each L it prints

- the start: max |logit difference| between DenseResNet-34 N=6 warm-started from a ResNet-34 and that ResNet-34;
- trainability: how far the gate outputs (mean v, mean w) move in 20 fine-tuning steps of DenseResNet-110 N=4
  warm-started from a ResNet-110, with timm's optimizer factory (SGD as in the recipes; AdamW), for each
  gate_logit_scale (the start does not depend on it: the warm start divides the logit by it);

and, at the default L, how close DenseMobileNetV2 N=4 warm-started from a MobileNetV2 starts (not exact: the 7
blocks where MobileNetV2 has no skip keep their shortcut).

The base networks are randomly initialised (BatchNorm statistics randomized, so no block is trivially zero) and
the data are random tensors: no ImageNet weights or data are needed, and the numbers show the scale of the
effect, not a trained model's. The largest ResNet-34 logit is printed too: a trained ResNet-34's logits are
larger, and its start difference grows in proportion.
"""
import argparse
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.gate_stats import record_gates
from timm_denseres.pretrained import WARM_START_GATE_LOGIT, warm_start_state_dict


def random_base(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def warm(dense_name: str, base: nn.Module, logit: float, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    dense = timm.create_model(dense_name, gate_logit_scale=scale)
    dense.load_state_dict(warm_start_state_dict(base.state_dict(), dense, logit))
    return dense.eval()


def start_difference(logits: List[float], size: int) -> Tuple[Dict[float, float], float]:
    base = random_base('resnet34', seed=0, zero_init_last=False)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(x)
        diff = {L: (warm('denseresnet34_n6', base, L)(x) - ref).abs().max().item() for L in logits}
    return diff, ref.abs().max().item()


def gate_outputs(model: nn.Module, x: torch.Tensor) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    with torch.no_grad(), record_gates(model) as stats:
        model(x)
    return stats.v_mean(), stats.w_mean()


def gate_movement(logits: List[float], opt: str, lr: float, steps: int,
                  scale: float) -> Dict[float, Tuple[float, float]]:
    base = random_base('resnet110.fmnist', seed=0, zero_init_last=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    out = {}
    for L in logits:
        dense = warm('denseresnet110_n4.fmnist', base, L, scale)
        v0, w0 = gate_outputs(dense, x[:16])
        optimizer = create_optimizer_v2(dense, opt, lr=lr, weight_decay=5e-4 if opt == 'sgd' else 0.05, momentum=0.9)
        dense.train()
        for step in range(steps):
            i = (step * 16) % 64
            loss = F.cross_entropy(dense(x[i:i + 16]), y[i:i + 16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        v1, w1 = gate_outputs(dense.eval(), x[:16])
        dv = sum(abs(v1[k] - v0[k]) for k in v0) / len(v0)
        dw = [abs(a - b) for k in w0 for a, b in zip(w0[k], w1[k])]
        out[L] = (dv, sum(dw) / len(dw))
    return out


def mobilenet_closeness(size: int) -> Dict[str, float]:
    base = random_base('mobilenetv2_100', seed=0)
    dense = warm('densemobilenetv2_n4', base, WARM_START_GATE_LOGIT)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = base(x), dense(x)
    return dict(rel_l2=((out - ref).norm() / ref.norm()).item(),
                cosine=F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item(),
                top1_agree=(out.argmax(1) == ref.argmax(1)).float().mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--logits', type=float, nargs='+', default=[4.0, 6.0, 10.0, WARM_START_GATE_LOGIT, 30.0])
    parser.add_argument('--size', type=int, default=224, help='input size of the ResNet-34 comparison')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--scales', type=float, nargs='+', default=[1.0, 10.0], help='gate_logit_scale values')
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, scale = start_difference(args.logits, args.size)
    print(f'| gate logit L | gate_logit_scale | start: max abs logit diff vs ResNet-34 ({args.size} px) '
          f'| {args.steps} SGD steps (lr 0.05): mean v / w move '
          f'| {args.steps} AdamW steps (lr 1e-3): mean v / w move |')
    print('|---|---|---|---|---|')
    for gate_scale in args.scales:
        sgd = gate_movement(args.logits, 'sgd', 0.05, args.steps, gate_scale)
        adamw = gate_movement(args.logits, 'adamw', 1e-3, args.steps, gate_scale)
        for L in args.logits:
            print(f'| {L:g}{" (default)" if L == WARM_START_GATE_LOGIT else ""} | {gate_scale:g} | {start[L]:.1e} '
                  f'| {sgd[L][0]:.1e} / {sgd[L][1]:.1e} | {adamw[L][0]:.1e} / {adamw[L][1]:.1e} |', flush=True)
    print(f'\nLargest ResNet-34 logit (abs) in the start comparison: {scale:.2f}')
    if 'densemobilenetv2_n4' in timm.list_models('densemobilenetv2*'):
        c = mobilenet_closeness(args.size)
        print(f'\nDenseMobileNetV2 N=4 warm-started from MobileNetV2 (L={WARM_START_GATE_LOGIT:g}, {args.size} px, '
              f'8 images): logits relative L2 difference {c["rel_l2"]:.2f}, cosine {c["cosine"]:.2f}, '
              f'top-1 agreement {c["top1_agree"]:.0%}')


if __name__ == '__main__':
    main()
