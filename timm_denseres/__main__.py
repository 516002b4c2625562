"""`python -m timm_denseres`: the main job on the embedded default.

Loads the bundled Fashion-MNIST checkpoint the way a user loads any timm checkpoint (`local-dir:` of its
Hub-layout folder), classifies the committed test sample, writes the gate figure (the paper's Fig. 4; needs
matplotlib), and prints the model table measured live against the paper's.

The checkpoint and the sample are files of the repository, not of the wheel: run it from a clone (or an editable
install of one), or name a checkpoint and an image folder with --model and --data-dir.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional

import timm
import torch

from . import model_table
from .evaluate import evaluate, make_loader
from .gate_figure import MATPLOTLIB_HINT, matplotlib_installed, plot_gate_weights
from .gate_stats import record_gates

# where a clone keeps them; an installed wheel has neither (site-packages/weights does not exist)
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_CHECKPOINT = REPO_ROOT / 'weights' / 'denseresnet20_n4.fmnist'
BUNDLED_SAMPLE = REPO_ROOT / 'data' / 'sample' / 'fashion-mnist'


def bundled_defaults(model: Optional[str], data_dir: Optional[Path]) -> tuple:
    """``(model, data_dir)`` with the bundled checkpoint and sample filled in where not given; exits with one
    instruction when a default is needed but this copy of the package is not a clone's."""
    missing = [path for path, needed in ((BUNDLED_CHECKPOINT / 'model.safetensors', model is None),
                                         (BUNDLED_SAMPLE, data_dir is None)) if needed and not path.exists()]
    if missing:
        names = ' and '.join(str(path.relative_to(REPO_ROOT)) for path in missing)
        sys.exit(f'python -m timm_denseres: no {names} in {REPO_ROOT}: the bundled checkpoint and sample come with '
                 'a clone of timm-denseres, not with the installed package. Run it in the root folder of a clone, '
                 'or pass --model (local-dir:DIR, hf-hub:ORG/NAME) and --data-dir (a folder '
                 'DIR/validation/<class>/<images>).')
    return model or f'local-dir:{BUNDLED_CHECKPOINT}', data_dir or BUNDLED_SAMPLE


def _shown(name) -> str:
    """A path, or local-dir:PATH, relative to the working folder where it lies inside it."""
    name = str(name)
    prefix = 'local-dir:' if name.startswith('local-dir:') else ''
    try:
        return prefix + str(Path(name[len(prefix):]).resolve().relative_to(Path.cwd()))
    except ValueError:
        return name


def classify_sample(model_name: str, data_dir: Path, split: str, figure: Path, shown: int) -> None:
    model = timm.create_model(model_name, pretrained=True).eval()
    loader = make_loader(model, str(data_dir), split, batch_size=100)
    with torch.no_grad(), record_gates(model) as stats:
        result = evaluate(model, loader)
    print(f'checkpoint: {_shown(model_name)}\n  {result.count} images of {_shown(data_dir / split)}: top-1 accuracy '
          f'{result.top1:.2f}%')
    names = result.class_names
    step = max(1, result.count // shown)
    for i in range(0, min(result.count, step * shown), step):
        mark = 'ok   ' if result.predictions[i] == result.targets[i] else 'WRONG'
        print(f'  {mark} image {i:3d}: predicted {names[result.predictions[i]]:<14} true {names[result.targets[i]]}')
    if not matplotlib_installed():
        print(f'  gate figure skipped: {MATPLOTLIB_HINT}')
        return
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_gate_weights(stats.w_mean(), str(figure), title=f'mean w_ik over {result.count} sample images')
    print(f'  gate figure (mean w_ik per block and offset): {figure}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='name.tag, local-dir:PATH or hf-hub:ORG/NAME (default: the bundled '
                        f'local-dir:{BUNDLED_CHECKPOINT.relative_to(REPO_ROOT)})')
    parser.add_argument('--data-dir', type=Path,
                        help=f'an image folder (default: the bundled {BUNDLED_SAMPLE.relative_to(REPO_ROOT)})')
    parser.add_argument('--split', default='validation')
    parser.add_argument('--figure', type=Path, default=Path('output') / 'gates_sample.png')
    parser.add_argument('--show', type=int, default=8, help='predictions to print')
    parser.add_argument('--no-table', action='store_true', help='skip the model table')
    args = parser.parse_args()

    model, data_dir = bundled_defaults(args.model, args.data_dir)
    classify_sample(model, data_dir, args.split, args.figure, args.show)
    if not args.no_table:
        print('\nModel table (measured live; MACs counted by torch.utils.flop_counter, see timm_denseres/flops.py):')
        print(model_table.format_table(model_table.measure_models()))


if __name__ == '__main__':
    main()
