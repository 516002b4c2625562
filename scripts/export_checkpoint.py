"""Turn a timm training checkpoint into a weights/ folder: exactly the files that go to the Hub.

    python scripts/export_checkpoint.py runs/fmnist/denseresnet110_n4/model_best.pth.tar --tag fmnist \\
        --top1 93.10 --top5 99.80 \\
        --train-command "python scripts/train.py --config recipes/fashion_mnist.yaml ..." \\
        --eval-command "python scripts/validate.py ..."

writes ``weights/denseresnet110_n4.fmnist/`` with

- ``config.json``: written by timm's own ``save_for_hf`` from the tagged cfg ``denseresnet110_n4.fmnist``;
- ``model.safetensors``: the EMA weights if the checkpoint has them (train.py's ``state_dict_ema``, what its
  best-checkpoint choice was measured on), else ``state_dict`` (``--weights`` to choose);
- ``README.md``: the model card, with Hub metadata (library_name timm, license, datasets, metrics, eval results),

and prints the sha256 line to record in ``timm_denseres/pretrained.py`` (``SHA256``). The model name comes from
the checkpoint's ``arch`` (train.py's ``--model``) unless ``--model`` is given; the tag must be registered (a
tagged cfg in the model's ``default_cfgs``), and the checkpoint's training arguments (classes, channels, input
size, mean/std) must agree with it.
"""
import argparse
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import clean_state_dict, get_pretrained_cfg, save_for_hf, split_model_name_tag

from timm_denseres.pretrained import HUB_FILES, WEIGHTS_FILE, PretrainedWeightsError, hub_repo_id, sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / 'weights'

# tag -> (Hub dataset id, name, evaluation split) for the card's metadata
DATASETS: Dict[str, Tuple[str, str, str]] = {
    'fmnist': ('zalando-datasets/fashion_mnist', 'Fashion-MNIST', 'test'),
    'cifar100': ('uoft-cs/cifar100', 'CIFAR-100', 'test'),
    'in1k': ('ILSVRC/imagenet-1k', 'ImageNet-1k', 'validation'),
}
# training arguments that must equal the tagged cfg, as (train.py dest, cfg key)
_MUST_MATCH = (('num_classes', 'num_classes'), ('in_chans', None), ('input_size', 'input_size'), ('mean', 'mean'),
               ('std', 'std'), ('crop_pct', 'crop_pct'), ('interpolation', 'interpolation'))
# training arguments worth a line in the card
_CARD_ARGS = ('epochs', 'batch_size', 'opt', 'lr', 'momentum', 'weight_decay', 'sched', 'warmup_epochs',
              'smoothing', 'drop_path', 'model_ema', 'model_ema_decay', 'train_crop_mode', 'scale', 'ratio',
              'hflip', 'seed')

CITATION = """@inproceedings{takeda2020denseresnet,
  author    = {Takeda, A.},
  title     = {Dense Residual Networks for Image Classification},
  booktitle = {Meeting on Image Recognition and Understanding (MIRU)},
  year      = {2020}
}"""


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


def read_checkpoint(path: Path, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], Optional[Namespace], str, str]:
    """The state dict to publish, train.py's args (if any), its arch and which weights were taken.

    ``weights``: 'auto' (EMA if present), 'ema' or 'model'. A bare state dict is taken as it is.
    """
    # train.py checkpoints pickle their argparse.Namespace; allow exactly that beside tensors
    with torch.serialization.safe_globals([Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ExportError(f'{path} does not hold a state dict or a timm training checkpoint')
    if 'state_dict' not in checkpoint and 'state_dict_ema' not in checkpoint:
        if weights == 'ema':
            raise ExportError(f'{path} is a bare state dict: it has no EMA weights')
        return clean_state_dict(checkpoint), None, '', 'state dict'
    has_ema = checkpoint.get('state_dict_ema') is not None
    if weights == 'ema' and not has_ema:
        raise ExportError(f'{path} has no EMA weights (state_dict_ema); train with --model-ema or pass --weights model')
    key = 'state_dict_ema' if has_ema and weights in ('auto', 'ema') else 'state_dict'
    return clean_state_dict(checkpoint[key]), checkpoint.get('args'), checkpoint.get('arch', ''), key


def check_args_match(args: Optional[Namespace], cfg: Dict[str, Any], name: str) -> None:
    """The data set-up the checkpoint was trained with must be the one the tagged cfg tells users to use."""
    if args is None:
        return
    problems = []
    for dest, cfg_key in _MUST_MATCH:
        value = getattr(args, dest, None)
        if value is None or value == '':
            continue  # not set: train.py took the model's default
        expected = cfg['input_size'][0] if dest == 'in_chans' else cfg.get(cfg_key)
        if isinstance(value, (list, tuple)):
            equal = len(value) == len(expected) and all(
                abs(float(a) - float(b)) < 1e-6 for a, b in zip(value, expected))
        elif isinstance(value, float):
            equal = abs(value - float(expected)) < 1e-6
        else:
            equal = value == expected
        if not equal:
            problems.append(f'{dest}: trained with {value!r}, {name} says {expected!r}')
    img_size = getattr(args, 'img_size', None)
    if img_size is not None and img_size != cfg['input_size'][-1]:
        problems.append(f'img_size: trained with {img_size!r}, {name} says {cfg["input_size"][-1]!r}')
    if problems:
        raise ExportError(f'The checkpoint was not trained with the data config of {name}:\n  ' + '\n  '.join(problems)
                          + f'\nFix the tagged cfg of {name}, or export under another tag.')


def build_model(name: str, state_dict: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tagged model with the checkpoint's weights, loaded strictly."""
    model = timm.create_model(name, pretrained=False)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ExportError(f'The checkpoint does not fit {name}: {e}') from e
    model.eval()
    size = model.pretrained_cfg['input_size']
    with torch.no_grad():
        out = model(torch.zeros(1, *size))
    if not torch.isfinite(out).all():
        raise ExportError(f'{name} gives non-finite logits with these weights')
    return model


def model_card(
        name: str,
        model: torch.nn.Module,
        sha256: str,
        weights_key: str,
        args: Optional[Namespace],
        top1: Optional[float],
        top5: Optional[float],
        train_command: Optional[str],
        eval_command: Optional[str],
        dataset: Optional[Tuple[str, str, str]],
) -> ModelCard:
    """README.md of the Hub repo: Hub metadata (YAML) and the card itself."""
    cfg = model.pretrained_cfg
    arch, tag = split_model_name_tag(name)
    dataset_id, dataset_name, split = dataset if dataset else (None, 'unknown', 'test')
    eval_results = None
    if top1 is not None and dataset_id:
        eval_results = [EvalResult(
            task_type='image-classification', dataset_type=dataset_id, dataset_name=dataset_name, dataset_split=split,
            metric_type='accuracy', metric_name='top-1 accuracy', metric_value=round(top1, 2))]
    data = ModelCardData(
        library_name='timm', license=cfg.get('license', 'apache-2.0'), pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-denseres', 'denseresnet'],
        datasets=[dataset_id] if dataset_id else None, metrics=['accuracy'],
        model_name=name, eval_results=eval_results)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    c, h, w = cfg['input_size']
    lines = [
        f'# Model card for {name}', '',
        f'{cfg.get("description", "")}', '',
        f'A Dense Residual Network from *{cfg.get("paper_name")}*: a ResNet whose blocks add a gated, per-channel mix '
        f'of the previous N block outputs instead of only the last one. Published by the timm-denseres project; '
        f'the model code is the `timm_denseres` package (a timm plugin).', '',
        '## Model details', '',
        f'- **Model type:** image classification',
        f'- **Architecture:** `{arch}` ({params_m:.2f} M parameters)',
        f'- **Input:** {c}x{h}x{w}, mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}, '
        f'crop_pct {cfg["crop_pct"]}, {cfg["interpolation"]}',
        f'- **Classes:** {cfg["num_classes"]}'
        + (f' ({", ".join(cfg["label_names"])})' if cfg.get('label_names') else ''),
        f'- **Dataset:** {dataset_name}' + (f' (`{dataset_id}`)' if dataset_id else ''),
        f'- **Weights:** {"the EMA weights" if weights_key == "state_dict_ema" else "the trained weights"} of the '
        f'checkpoint (`{weights_key}`)',
        f'- **sha256 of {WEIGHTS_FILE}:** `{sha256}` (checked by timm_denseres on every load)',
        f'- **Paper:** {cfg.get("paper_name")}', '',
        '## Training', '',
        'Trained with timm\'s own `train.py` (`scripts/train.py` of timm-denseres runs it with the models registered):',
        '', '```bash', train_command or 'not given (--train-command)', '```', '',
    ]
    if args is not None:
        shown = [k for k in _CARD_ARGS if getattr(args, k, None) is not None
                 and not (k == 'model_ema_decay' and not getattr(args, 'model_ema', False))]
        settings = [f'{k}={getattr(args, k)!r}' for k in shown]
        lines += ['Settings read from the checkpoint: ' + ', '.join(settings) + '.', '']
    lines += ['## Results', '']
    if top1 is not None:
        lines += [f'| dataset | split | top-1 (%) | top-5 (%) |', '|---|---|---|---|',
                  f'| {dataset_name} | {split} | {top1:.2f} | {"" if top5 is None else f"{top5:.2f}"} |', '']
        lines += ['Measured with:', '', '```bash', eval_command or 'not given (--eval-command)', '```', '']
    else:
        lines += ['Not measured yet.', '']
    lines += [
        '## Usage', '',
        '```python',
        'import timm',
        'import timm_denseres  # registers the DenseResNet models with timm',
        '',
        f"model = timm.create_model('{name}', pretrained=True).eval()",
        f"# or: timm.create_model('hf-hub:{hub_repo_id(name)}', pretrained=True)",
        'config = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**config)',
        '',
        'from PIL import Image',
        f"image = Image.open('image.png').convert('{'L' if cfg['input_size'][0] == 1 else 'RGB'}')",
        'probabilities = model(transform(image).unsqueeze(0)).softmax(dim=-1)',
        '```', '',
        '## Citation', '', '```bibtex', CITATION, '```', '',
    ]
    return ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines))


def export(
        checkpoint: Path,
        tag: str,
        model_name: Optional[str] = None,
        weights: str = 'auto',
        out_dir: Path = DEFAULT_OUT,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        train_command: Optional[str] = None,
        eval_command: Optional[str] = None,
        dataset: Optional[Tuple[str, str, str]] = None,
        overwrite: bool = False,
) -> Path:
    """Write ``out_dir/{model}.{tag}/`` (config.json, model.safetensors, README.md) and return that folder."""
    state_dict, args, arch, weights_key = read_checkpoint(Path(checkpoint), weights)
    arch = split_model_name_tag(model_name or arch)[0]
    if not arch:
        raise ExportError(f'{checkpoint} does not name its model (no "arch"): pass --model')
    name = f'{arch}.{tag}'
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as e:
        raise ExportError(f'{name} is not a registered pretrained cfg: add the tag to {arch}\'s default_cfgs '
                          f'(timm_denseres.pretrained.hub_cfgs) first. ({e})') from e
    cfg = cfg.to_dict()
    if cfg.get('hf_hub_id') != hub_repo_id(name):
        raise ExportError(f'{name} is not published by the project (its hf_hub_id is {cfg.get("hf_hub_id")!r}, not '
                          f'{hub_repo_id(name)!r}): export under a tag made with hub_cfgs()')
    check_args_match(args, cfg, name)
    model = build_model(name, state_dict)

    folder = Path(out_dir) / name
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ExportError(f'{folder} exists and is not empty (pass --overwrite to replace its files)')
        extra = sorted(p.name for p in folder.iterdir() if p.name not in HUB_FILES)
        if extra:
            raise ExportError(f'{folder} holds files that are not a checkpoint\'s ({", ".join(extra)}): '
                              f'not touching it')
    save_for_hf(model, folder, safe_serialization=True)  # timm's own: config.json + model.safetensors
    sha256 = sha256_file(folder / WEIGHTS_FILE)
    dataset = dataset or DATASETS.get(tag.split('_')[-1]) or DATASETS.get(tag)
    card = model_card(name, model, sha256, weights_key, args, top1, top5, train_command, eval_command, dataset)
    card.save(folder / 'README.md')
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', type=Path, help='train.py checkpoint (model_best.pth.tar) or a state dict')
    parser.add_argument('--tag', required=True, help='pretrained tag, e.g. fmnist (must be registered)')
    parser.add_argument('--model', default=None, help='model name (default: the checkpoint\'s arch)')
    parser.add_argument('--weights', choices=('auto', 'ema', 'model'), default='auto',
                        help='auto: EMA weights if the checkpoint has them (default)')
    parser.add_argument('--out-dir', type=Path, default=DEFAULT_OUT, help=f'default: {DEFAULT_OUT}')
    parser.add_argument('--top1', type=float, default=None, help='measured top-1 accuracy (%%) for the card')
    parser.add_argument('--top5', type=float, default=None, help='measured top-5 accuracy (%%) for the card')
    parser.add_argument('--train-command', default=None, help='the command that trained it, for the card')
    parser.add_argument('--eval-command', default=None, help='the command that measured --top1/--top5')
    parser.add_argument('--overwrite', action='store_true', help='replace the files of an existing folder')
    args = parser.parse_args(argv)
    try:
        folder = export(args.checkpoint, args.tag, args.model, args.weights, args.out_dir, args.top1, args.top5,
                        args.train_command, args.eval_command, overwrite=args.overwrite)
    except (ExportError, PretrainedWeightsError) as e:
        sys.exit(f'error: {e}')
    sha256 = sha256_file(folder / WEIGHTS_FILE)
    print(f'wrote {folder}: ' + ', '.join(sorted(p.name for p in folder.iterdir())))
    print('record its checksum in timm_denseres/pretrained.py, SHA256:')
    print(f"    '{folder.name}': '{sha256}',")


if __name__ == '__main__':
    main()
