r"""Draw the paper's Fig. 4 for a checkpoint: mean w_ik per block and offset over an image folder, and say how far
its gates are from a freshly created model's (the same architecture and gate scale, untrained) on the same images.

    python scripts/plot_gates.py --model local-dir:weights/denseresnet56_n4.fmnist \
        --data-dir data/sample/fashion-mnist --split validation --out output/gates_denseresnet56_n4_fmnist.png
"""
import argparse
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.evaluate import make_loader
from timm_denseres.gate_figure import plot_gate_weights
from timm_denseres.gate_stats import gate_modules, mix_shift, record_gates
from timm_denseres.pretrained import PretrainedWeightsError
from timm_denseres.timm_scripts import ArgumentError, check_model


def mean_mix(model: torch.nn.Module, loader) -> dict:
    with torch.no_grad(), record_gates(model) as stats:
        for images, _ in tqdm(loader, desc='gates', unit='batch'):
            model(images)
    return stats.w_mean()


def fresh_like(model: torch.nn.Module) -> torch.nn.Module:
    """The untrained model a checkpoint started from, as far as the defaults go: its architecture, classes, input
    channels and gate scale."""
    cfg = model.pretrained_cfg
    return timm.create_model(cfg['architecture'], num_classes=model.num_classes, in_chans=cfg['input_size'][0],
                             gate_logit_scale=model.gate_logit_scale).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='timm model name, name.tag, local-dir:PATH or hf-hub:ORG/NAME')
    parser.add_argument('--data-dir', required=True, help='ImageFolder root holding SPLIT/<class>/<images>')
    parser.add_argument('--split', default='validation')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--batch-size', type=int, default=100)
    args = parser.parse_args()

    try:
        check_model(args.model)
        model = timm.create_model(args.model, pretrained=True).eval()
        if not gate_modules(model):
            raise ArgumentError(f'--model {args.model}: {model.pretrained_cfg["architecture"]} has no Gate-Modules '
                                '(a baseline), so no mixing weights to draw')
        loader = make_loader(model, args.data_dir, args.split, batch_size=args.batch_size)
    except (ArgumentError, PretrainedWeightsError, FileNotFoundError) as e:
        parser.exit(2, f'error: {e}\n')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    w = mean_mix(model, loader)
    plot_gate_weights(w, args.out, title=f'{Path(args.model).name}: mean w_ik over {args.split}')
    print(f'wrote {args.out}')
    shift = mix_shift(w, mean_mix(fresh_like(model), loader))
    print(f'mean |w - w of a fresh {model.pretrained_cfg["architecture"]}| over blocks and inbounds: {shift:.4f}')


if __name__ == '__main__':
    main()
