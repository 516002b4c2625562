"""Draw the paper's Fig. 4 for a checkpoint: mean w_ik per block and offset over an image folder.

    python scripts/plot_gates.py --model local-dir:weights/denseresnet110_n4.fmnist \
        --data-dir data/fashion-mnist --split validation --out output/gates_denseresnet110_n4_fmnist.png
"""
import argparse
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.evaluate import make_loader
from timm_denseres.gate_figure import plot_gate_weights
from timm_denseres.gate_stats import record_gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='timm model name, name.tag, local-dir:PATH or hf-hub:ORG/NAME')
    parser.add_argument('--data-dir', required=True, help='ImageFolder root holding SPLIT/<class>/<images>')
    parser.add_argument('--split', default='validation')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--batch-size', type=int, default=100)
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=True).eval()
    loader = make_loader(model, args.data_dir, args.split, batch_size=args.batch_size)
    with torch.no_grad(), record_gates(model) as stats:
        for images, _ in tqdm(loader, desc='gates', unit='batch'):
            model(images)
    plot_gate_weights(stats.w_mean(), args.out, title=f'{Path(args.model).name}: mean w_ik over {args.split}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
