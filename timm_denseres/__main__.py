"""`python -m timm_denseres`: the main job on the embedded default.

Loads the bundled Fashion-MNIST checkpoint the way a user loads any timm checkpoint (`local-dir:` of its
Hub-layout folder), classifies the committed test sample, writes the gate figure (the paper's Fig. 4), and prints
the model table measured live against the paper's.
"""
import argparse
from pathlib import Path

import timm
import torch

from . import model_table
from .evaluate import evaluate, make_loader
from .gate_figure import plot_gate_weights
from .gate_stats import record_gates

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = f'local-dir:{REPO_ROOT / "weights" / "denseresnet110_n4.fmnist"}'
DEFAULT_DATA = REPO_ROOT / 'data' / 'sample' / 'fashion-mnist'


def classify_sample(model_name: str, data_dir: Path, split: str, figure: Path, shown: int) -> None:
    model = timm.create_model(model_name, pretrained=True).eval()
    loader = make_loader(model, str(data_dir), split, batch_size=100)
    with torch.no_grad(), record_gates(model) as stats:
        result = evaluate(model, loader)
    print(f'{model_name}\n  {result.count} images of {data_dir}/{split}: top-1 accuracy {result.top1:.2f}%')
    names = result.class_names
    step = max(1, result.count // shown)
    for i in range(0, min(result.count, step * shown), step):
        mark = 'ok   ' if result.predictions[i] == result.targets[i] else 'WRONG'
        print(f'  {mark} image {i:3d}: predicted {names[result.predictions[i]]:<14} true {names[result.targets[i]]}')
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_gate_weights(stats.w_mean(), str(figure), title=f'mean w_ik over {result.count} sample images')
    print(f'  gate figure (mean w_ik per block and offset): {figure}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=DEFAULT_MODEL, help='name.tag, local-dir:PATH or hf-hub:ORG/NAME')
    parser.add_argument('--data-dir', type=Path, default=DEFAULT_DATA)
    parser.add_argument('--split', default='validation')
    parser.add_argument('--figure', type=Path, default=Path('output') / 'gates_sample.png')
    parser.add_argument('--show', type=int, default=8, help='predictions to print')
    parser.add_argument('--no-table', action='store_true', help='skip the model table')
    args = parser.parse_args()

    classify_sample(args.model, args.data_dir, args.split, args.figure, args.show)
    if not args.no_table:
        print('\nModel table (measured live; MACs counted by torch.utils.flop_counter, see timm_denseres/flops.py):')
        print(model_table.format_table(model_table.measure_models()))


if __name__ == '__main__':
    main()
