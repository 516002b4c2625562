"""Test error per epoch, baseline against DenseResNet (the paper's Fig. 3/5), from timm train.py outputs.

    python scripts/plot_curves.py --run resnet110=runs/fmnist/resnet110 \
        --run denseresnet110_n4=runs/fmnist/denseresnet110_n4 --out docs/curves_fmnist.png
"""
import argparse
import csv
import os
from typing import List, Tuple


def read_summary(run_dir: str) -> Tuple[List[int], List[float]]:
    """Epochs and top-1 error (%) from the summary.csv that timm's train.py writes each epoch."""
    path = os.path.join(run_dir, 'summary.csv')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: point --run at a timm train.py output folder')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    return [int(r['epoch']) + 1 for r in rows], [100.0 - float(r['eval_top1']) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', action='append', required=True, help='LABEL=DIR of a train.py output folder')
    parser.add_argument('--out', required=True)
    parser.add_argument('--title', default='Fashion-MNIST: test error per epoch')
    args = parser.parse_args()

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for spec in args.run:
        label, _, run_dir = spec.partition('=')
        epochs, errors = read_summary(run_dir)
        ax.plot(epochs, errors, marker='o', label=label)
        print(f'{label}: ' + ', '.join(f'epoch {e}: {err:.2f}%' for e, err in zip(epochs, errors)))
    ax.set_xlabel('epoch')
    ax.set_ylabel('top-1 error (%)')
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
