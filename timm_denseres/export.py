"""A timm training checkpoint as a checkpoint folder: exactly the files of its Hugging Face Hub repo.

:func:`export` (``scripts/export_checkpoint.py``) writes ``{out_dir}/{model}.{tag}/`` with

- ``config.json``: written by timm's own ``save_for_hf``: the architecture and the tagged pretrained_cfg, whose data
  config (input size, mean/std, crop_pct, interpolation) and classes are those the run trained with (train.py's
  arguments, pickled in its checkpoint or read from ``--train-args args.yaml``), the label names (``--label-names``,
  else the class folders of the run's training data), and ``weights_sha256``, the checksum of the weights, which
  every load checks (``timm_denseres.pretrained.CONFIG_SHA256_KEY``);
- ``model.safetensors``: the EMA weights if the checkpoint has them (train.py's ``state_dict_ema``), else
  ``state_dict`` (``--weights`` to choose);
- ``README.md``: the model card, with Hub metadata (library_name timm, license, datasets, metrics, eval results).

The model is the run's ``--model`` (a name, ``name.tag``, ``local-dir:DIR`` or ``hf-hub:ORG/NAME``, whose
config.json names the architecture) unless ``--model`` is given here. Any tag can be exported; but a tag that names
a published checkpoint (``timm_denseres.pretrained.PUBLISHED``) or a known dataset (``DATASETS``: ``fmnist``,
``..._in1k``) promises that data set-up, and a run trained otherwise is refused rather than given its card.
"""
import argparse
import json
import re
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import (
    get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, save_for_hf, split_model_name_tag)
from timm.models._hub import save_config_for_hf

from .gate import DenseGate
from .pretrained import (
    CONFIG_SHA256_KEY, DATASETS, HUB_FILES, HUB_ORG, PUBLISHED, WARM_STARTS, WEIGHTS_FILE, Dataset,
    PretrainedWeightsError, dataset_of_tag, hub_repo_id, published_cfg, sha256_file, with_data_config)
from .train_run import SOURCE_KEYS, RunError, TrainRun, read_train_run, run_class_names, run_data_config, start_cfg

__all__ = ['ExportError', 'Promise', 'promised_cfg', 'build_model', 'model_card', 'write_folder', 'export',
           'add_export_arguments', 'export_from_args', 'main']

# the data config a tag promises, as compared with the run's
_DATA_KEYS = ('num_classes', 'input_size', 'mean', 'std', 'crop_pct', 'interpolation')
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


class ExportError(RunError):
    """The checkpoint cannot be exported as asked; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# What a tag promises


def _plain(name: str) -> str:
    """A class name without case, punctuation or a leading index: '3_dress' and 'Dress' are the same class."""
    return re.sub(r'[^0-9a-z]', '', re.sub(r'^\d+[_\-. ]', '', name.lower()))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-6
    return a == b


class Promise(NamedTuple):
    """What a tag stands for: whose promise it is, the cfg the export gets, and the keys the run must match."""
    whose: str
    cfg: Dict[str, Any]
    keys: Tuple[str, ...]
    dataset: Dataset


def promised_cfg(arch: str, tag: str) -> Optional[Promise]:
    """What ``{arch}.{tag}`` promises, if anything. A registered tag promises its cfg; an unregistered tag that
    names a dataset of ``DATASETS`` promises that dataset (the cfg it will get once it is in PUBLISHED)."""
    name = f'{arch}.{tag}'
    dataset = dataset_of_tag(tag)
    if name in get_arch_pretrained_cfgs(arch):
        cfg = get_pretrained_cfg(name).to_dict()
        if name in WARM_STARTS or cfg.get('hf_hub_id') != hub_repo_id(name):
            raise ExportError(f'{name} is not a checkpoint of the project (its weights are {cfg.get("hf_hub_id")!r}, '
                              f'a warm start): export under a tag of your own')
        dataset = PUBLISHED[name].dataset if name in PUBLISHED else dataset
        info = DATASETS[dataset] if dataset else Dataset(tag, None, 'test', '')
        return Promise(f'the published {name}', cfg, _DATA_KEYS, info)
    if dataset is None:
        return None
    info = DATASETS[dataset]
    cfg = dict(published_cfg(name, get_pretrained_cfg(arch).to_dict(), dataset), tag=tag)
    keys = tuple(k for k in _DATA_KEYS if k in (info.data or {})) + ('num_classes',)
    return Promise(f'tag {tag!r} ({info.name})', cfg, keys, info)


def _check_promise(promise: Promise, run: Dict[str, Any], labels: Optional[List[str]], labels_from: str,
                   tag: str) -> None:
    """Refuse a run that was not trained on what the tag promises (data config, classes, label names)."""
    whose, promised = promise.whose, promise.cfg
    problems = [f'{k}: the run has {run[k]!r}, {whose} has {promised.get(k)!r}'
                for k in dict.fromkeys(promise.keys) if k in run and not _equal(run[k], promised.get(k))]
    want = promised.get('label_names')
    if labels and want and [_plain(n) for n in labels] != [_plain(n) for n in want]:
        problems.append(f'label names: the run has {", ".join(labels)} ({labels_from}), {whose} has '
                        f'{", ".join(want)}')
    if problems:
        raise ExportError(
            f'--tag {tag} claims {whose}, but the run was trained on something else: '
            + '; '.join(problems) + '. Export it under a tag of your own (e.g. --tag mydata).')


# ---------------------------------------------------------------------------------------------------------------
# The folder


def build_model(arch: str, cfg: Dict[str, Any], model_args: Dict[str, Any],
                state_dict: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model with this pretrained cfg and the checkpoint's weights, loaded strictly."""
    # newer timm puts num_classes (and in_chans) into a local-dir: folder's model_args too: the cfg's values win
    kwargs = dict(model_args, num_classes=cfg['num_classes'], in_chans=cfg['input_size'][0])
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg, **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ExportError(f'the checkpoint does not fit {arch} with {cfg["num_classes"]} classes and '
                          f'{cfg["input_size"][0]} input channels: {e}') from None
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *cfg['input_size']))
    if not torch.isfinite(out).all():
        raise ExportError(f'{arch} gives non-finite logits with these weights')
    return model


def model_card(
        name: str,
        model: torch.nn.Module,
        sha256: str,
        weights_key: str,
        args: Optional[Namespace],
        dataset: Dataset,
        repo_id: Optional[str],
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        train_command: Optional[str] = None,
        eval_command: Optional[str] = None,
) -> ModelCard:
    """README.md of the Hub repo: Hub metadata (YAML) and the card itself."""
    cfg = model.pretrained_cfg
    arch, tag = split_model_name_tag(name)
    dense = any(isinstance(m, DenseGate) for m in model.modules())
    eval_results = None
    if top1 is not None and dataset.hub_id:
        eval_results = [EvalResult(
            task_type='image-classification', dataset_type=dataset.hub_id, dataset_name=dataset.name,
            dataset_split=dataset.split, metric_type='accuracy', metric_name='top-1 accuracy',
            metric_value=round(top1, 2))]
    data = ModelCardData(
        library_name='timm', license=cfg.get('license', 'apache-2.0'), pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-denseres'] + (['denseresnet'] if dense else []),
        datasets=[dataset.hub_id] if dataset.hub_id else None, metrics=['accuracy'],
        model_name=name, eval_results=eval_results)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    c, h, w = cfg['input_size']
    project = repo_id is not None and repo_id.startswith(HUB_ORG + '/')
    lines = [
        f'# Model card for {name}', '',
        f'{cfg.get("description", "")}', '',
        (f'A Dense Residual Network from *{cfg.get("paper_name")}*: a ResNet whose blocks add a gated, per-channel mix '
         f'of the previous N block outputs instead of only the last one. ' if dense else
         f'The plain baseline (no Gate-Modules: each block adds only the last output) that the Dense Residual '
         f'Networks of *{cfg.get("paper_name")}* are compared with. ')
        + ('Published by the timm-denseres project; t' if project else 'T')
        + 'he model code is the `timm_denseres` package (a timm plugin).', '',
        '## Model details', '',
        '- **Model type:** image classification',
        f'- **Architecture:** `{arch}` ({params_m:.2f} M parameters)',
        f'- **Input:** {c}x{h}x{w}, mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}, '
        f'crop_pct {cfg["crop_pct"]}, {cfg["interpolation"]}',
        f'- **Classes:** {cfg["num_classes"]}'
        + (f' ({", ".join(cfg["label_names"])})' if cfg.get('label_names') else ''),
        f'- **Dataset:** {dataset.name}' + (f' (`{dataset.hub_id}`)' if dataset.hub_id else ''),
        f'- **Weights:** {"the EMA weights" if weights_key == "state_dict_ema" else "the trained weights"} of the '
        f'checkpoint (`{weights_key}`)',
        f'- **sha256 of {WEIGHTS_FILE}:** `{sha256}` (also in config.json; checked by timm_denseres on every load)',
        f'- **Paper:** {cfg.get("paper_name")}', '',
        '## Training', '',
        'Trained with timm\'s own `train.py` (`scripts/train.py` of timm-denseres runs it with the models registered):',
        '', '```bash', train_command or 'not given (--train-command)', '```', '',
    ]
    if args is not None:
        shown = [k for k in _CARD_ARGS if getattr(args, k, None) is not None
                 and not (k == 'model_ema_decay' and not getattr(args, 'model_ema', False))]
        lines += ['Settings read from the checkpoint: ' + ', '.join(f'{k}={getattr(args, k)!r}' for k in shown) + '.',
                  '']
    lines += ['## Results', '']
    if top1 is not None:
        lines += ['| dataset | split | top-1 (%) | top-5 (%) |', '|---|---|---|---|',
                  f'| {dataset.name} | {dataset.split} | {top1:.2f} | {"" if top5 is None else f"{top5:.2f}"} |', '',
                  'Measured with:', '', '```bash', eval_command or 'not given (--eval-command)', '```', '']
    else:
        lines += ['Not measured yet.', '']
    if project:
        loads = [f"model = timm.create_model('{name}', pretrained=True).eval()",
                 f"# or: timm.create_model('hf-hub:{repo_id}', pretrained=True)"]
    elif repo_id:
        loads = [f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"]
    else:
        loads = [f"model = timm.create_model('local-dir:{name}', pretrained=True).eval()  # this folder"]
    lines += [
        '## Usage', '',
        '```python',
        'import timm',
        'import timm_denseres  # registers the DenseResNet models with timm',
        '',
        *loads,
        'config = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**config)',
        '',
        'from PIL import Image',
        f"image = Image.open('image.png').convert('{'L' if c == 1 else 'RGB'}')",
        'probabilities = model(transform(image).unsqueeze(0)).softmax(dim=-1)',
        '```', '',
        '## Citation', '', '```bibtex', CITATION, '```', '',
    ]
    return ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines))


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ExportError(f'{folder} exists and is not empty (pass --overwrite to replace its files)')
        extra = sorted(p.name for p in folder.iterdir() if p.name not in HUB_FILES)
        if extra:
            raise ExportError(f'{folder} holds files that are not a checkpoint\'s ({", ".join(extra)}): '
                              f'not touching it')


def write_folder(model: torch.nn.Module, folder: Path, model_args: Dict[str, Any]) -> str:
    """config.json and model.safetensors, both by timm's own writers; config.json carries the weights' sha256.
    Returns that sha256."""
    save_for_hf(model, folder, model_args=model_args or None, safe_serialization=True)
    sha256 = sha256_file(folder / WEIGHTS_FILE)
    save_config_for_hf(model, folder / 'config.json', model_config={CONFIG_SHA256_KEY: sha256},
                       model_args=model_args or None)
    return sha256


def _description(run: TrainRun, data: Dict[str, Any], dataset_name: str) -> str:
    """'Fine-tuned on digits (10 classes, 1x28x28) with timm's train.py, starting from local-dir:...'."""
    source, name = parse_model_name(run.model) if run.model else (None, '')
    from_weights = getattr(run.args, 'pretrained', False) and (source or split_model_name_tag(name)[1])
    c, h, w = data['input_size']
    return (f'{"Fine-tuned" if from_weights else "Trained"} on {dataset_name} ({data["num_classes"]} classes, '
            f'{c}x{h}x{w}) with timm\'s train.py' + (f', starting from {run.model}.' if from_weights else '.'))


def export(
        checkpoint: Path,
        tag: str,
        *,
        model_name: Optional[str] = None,
        weights: str = 'auto',
        out_dir: Path = Path('weights'),
        train_args: Optional[Path] = None,
        label_names: Optional[Sequence[str]] = None,
        data_dir: Optional[Path] = None,
        dataset_id: Optional[str] = None,
        dataset_name: Optional[str] = None,
        repo_id: Optional[str] = None,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        train_command: Optional[str] = None,
        eval_command: Optional[str] = None,
        overwrite: bool = False,
) -> Path:
    """Write ``out_dir/{model}.{tag}/`` (config.json, model.safetensors, README.md) and return that folder.

    ``model_name`` overrides the run's ``--model`` (needed when that was a ``local-dir:`` folder that has moved);
    ``label_names`` or ``data_dir`` (the training ImageFolder) give the classes their names; ``dataset_id`` /
    ``dataset_name`` describe the data in the card; ``repo_id`` is where the folder will be published (the card's
    usage line), by default the project's repo for a tag that names a published checkpoint or a known dataset.
    """
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_]*', tag):
        raise ExportError(f'tag {tag!r}: use letters, digits and underscores (timm splits model names at the dot)')
    run = read_train_run(Path(checkpoint), weights, train_args)
    model_name = model_name or run.model
    if not model_name:
        raise ExportError(f'{checkpoint} does not name its model (no "arch" or args): pass --model')
    arch, start, model_args = start_cfg(model_name)
    model_args.update(getattr(run.args, 'model_kwargs', None) or {})
    name = f'{arch}.{tag}'
    promise = promised_cfg(arch, tag)
    if run.args is None and promise is None:
        raise ExportError(f'{checkpoint} carries no training arguments, so its data config is unknown: pass '
                          f'--train-args with the args.yaml train.py wrote next to it')
    run_cfg = run_data_config(run.args, start) if run.args is not None else None
    labels_from = '--label-names' if label_names else 'its class folders'
    labels = list(label_names) if label_names else run_class_names(run.args, data_dir)

    if promise is not None:
        _check_promise(promise, run_cfg or {}, labels, labels_from, tag)
        cfg, dataset = promise.cfg, promise.dataset
        repo_id = repo_id or hub_repo_id(name)
    else:
        if labels is not None and len(labels) != run_cfg['num_classes']:
            raise ExportError(f'{len(labels)} label names ({labels_from}) for {run_cfg["num_classes"]} classes')
        dataset = Dataset(dataset_name or tag, dataset_id, 'validation', '')
        cfg = with_data_config(get_pretrained_cfg(arch).to_dict(remove_source=True),
                               dict(run_cfg, label_names=tuple(labels) if labels else None))
        cfg.update(tag=tag, description=_description(run, run_cfg, dataset.name))
    if dataset_id or dataset_name:
        dataset = dataset._replace(hub_id=dataset_id or dataset.hub_id, name=dataset_name or dataset.name)
    cfg = {k: v for k, v in cfg.items() if k not in SOURCE_KEYS}  # config.json never holds them
    model = build_model(arch, cfg, model_args, run.state_dict)

    folder = Path(out_dir) / name
    _prepare_folder(folder, overwrite)
    if getattr(model, 'dense_n', 0):  # the weights' gates need their scale; a later default must not replace it
        model_args = dict(model_args, gate_logit_scale=model.gate_logit_scale)
    sha256 = write_folder(model, folder, model_args)
    card = model_card(name, model, sha256, run.weights_key, run.args, dataset, repo_id, top1, top5, train_command,
                      eval_command)
    card.save(folder / 'README.md')
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an export, shared by scripts/export_checkpoint.py and scripts/publish.py --checkpoint."""
    parser.add_argument('--tag', help='pretrained tag, e.g. digits (any name of your own; fmnist, cifar100, '
                                      '..._in1k promise those datasets)')
    parser.add_argument('--model', default=None, help='architecture (default: the run\'s --model)')
    parser.add_argument('--weights', choices=('auto', 'ema', 'model'), default='auto',
                        help='auto: EMA weights if the checkpoint has them (default)')
    parser.add_argument('--train-args', type=Path, default=None,
                        help='train.py\'s args.yaml, for a checkpoint without its arguments')
    parser.add_argument('--label-names', nargs='+', default=None, help='class names, in label order')
    parser.add_argument('--data-dir', type=Path, default=None,
                        help='the training ImageFolder, for the label names (default: the run\'s --data-dir)')
    parser.add_argument('--dataset-id', default=None, help='Hub dataset id for the card, e.g. ORG/NAME')
    parser.add_argument('--dataset-name', default=None, help='dataset name for the card (default: the tag)')
    parser.add_argument('--top1', type=float, default=None, help='measured top-1 accuracy (%%) for the card')
    parser.add_argument('--top5', type=float, default=None, help='measured top-5 accuracy (%%) for the card')
    parser.add_argument('--train-command', default=None, help='the command that trained it, for the card')
    parser.add_argument('--eval-command', default=None, help='the command that measured --top1/--top5')


def export_from_args(args: Namespace, out_dir: Path, repo_id: Optional[str], overwrite: bool) -> Path:
    return export(
        args.checkpoint, args.tag, model_name=args.model, weights=args.weights, out_dir=out_dir,
        train_args=args.train_args, label_names=args.label_names, data_dir=args.data_dir,
        dataset_id=args.dataset_id, dataset_name=args.dataset_name, repo_id=repo_id, top1=args.top1,
        top5=args.top5, train_command=args.train_command, eval_command=args.eval_command, overwrite=overwrite)


def _next_steps(folder: Path) -> List[str]:
    name = folder.name
    config = json.loads((folder / 'config.json').read_text())
    sha256 = config[CONFIG_SHA256_KEY]
    scale = (config.get('model_args') or {}).get('gate_logit_scale', 1.0)
    lines = [f'wrote {folder}: ' + ', '.join(sorted(p.name for p in folder.iterdir())),
             f'sha256({WEIGHTS_FILE}) = {sha256} (recorded in its config.json)',
             f"load it: timm.create_model('local-dir:{folder}', pretrained=True)"]
    dataset = dataset_of_tag(split_model_name_tag(name)[1])
    recorded = PUBLISHED.get(name)
    if recorded is not None and recorded.sha256 == sha256:
        return lines
    if dataset is not None or recorded is not None:
        lines += [('replace its line' if recorded else 'add this line')
                  + ' in PUBLISHED (timm_denseres/pretrained.py) to publish it as the project\'s checkpoint:',
                  f"    '{name}': Published('{recorded.dataset if recorded else dataset}', '{sha256}'"
                  + (f', gate_logit_scale={scale!r})' if scale != 1.0 else ')') + ',']
    else:
        lines.append(f'publish it: python scripts/publish.py {folder} --repo-id YOUR-ORG/{name}')
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='example: python scripts/export_checkpoint.py output/train/digits/last.pth.tar --tag digits')
    parser.add_argument('checkpoint', type=Path, help='train.py checkpoint (last.pth.tar, model_best.pth.tar) or a '
                                                      'state dict')
    add_export_arguments(parser)
    parser.add_argument('--out-dir', type=Path, default=Path('weights'), help='default: weights')
    parser.add_argument('--repo-id', default=None, help='the Hub repo it will be published as, for the card '
                                                        f'(default: {HUB_ORG}/<name> for the project\'s tags)')
    parser.add_argument('--overwrite', action='store_true', help='replace the files of an existing folder')
    args = parser.parse_args(argv)
    if not args.tag:
        parser.error('--tag is required')
    try:
        folder = export_from_args(args, args.out_dir, args.repo_id, args.overwrite)
    except (RunError, PretrainedWeightsError) as e:
        sys.exit(f'error: {e}')
    print('\n'.join(_next_steps(folder)))
