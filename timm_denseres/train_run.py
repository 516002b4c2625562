"""What a timm ``train.py`` run says about itself: the weights in its checkpoint, its arguments, the model it
started from and the data config it evaluated with. Read safely: ``torch.load(weights_only=True)``, allowing
train.py's ``argparse.Namespace`` and nothing else.

Used by the export (timm_denseres/export.py) and by the launcher of timm's validate.py (timm_scripts.py), which
takes a checkpoint's data config from its run.
"""
import pickle
import re
import zipfile
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import yaml
from huggingface_hub import try_to_load_from_cache
from timm.data import create_dataset, resolve_data_config
from timm.models import (
    clean_state_dict, get_pretrained_cfg, is_model, list_models, parse_model_name, split_model_name_tag)
from timm.models._hub import hf_split, load_model_config_from_path

from .pretrained import recorded_gate_scale

__all__ = ['RunError', 'TrainRun', 'read_train_args', 'read_train_run', 'start_cfg', 'run_data_config',
           'class_names', 'run_class_names']

SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source')
"""Where a pretrained cfg's weights come from: not part of a data config, nor of a config.json."""


class RunError(RuntimeError):
    """A training checkpoint or what it says about its run cannot be read; the message says why."""


class TrainRun(NamedTuple):
    state_dict: Dict[str, torch.Tensor]
    args: Optional[Namespace]  # train.py's arguments
    model: str  # train.py's --model, as given (a name, name.tag, local-dir:DIR, hf-hub:ORG/NAME), or ''
    weights_key: str  # which weights: 'state_dict_ema', 'state_dict', or 'state dict' (a bare one)


def _load(path: Path) -> Any:
    """torch.load of tensors, containers and train.py's argparse.Namespace only: nothing that could run code."""
    if not path.is_file():
        raise RunError(f'{path}: no such file')
    with open(path, 'rb') as f:
        legacy_pickle = f.read(1) == b'\x80'  # torch.save's format before torch 1.6
    if not (zipfile.is_zipfile(path) or legacy_pickle):  # a truncated archive has lost its central directory
        raise RunError(f'{path} is not a torch checkpoint (torch.save writes a zip archive): truncated, or a file '
                       f'of another format')
    try:
        with torch.serialization.safe_globals([Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if not found:
            raise RunError(f'{path} is not a checkpoint torch.load can read ({str(e).splitlines()[0]})') from None
        raise RunError(
            f'{path} holds Python objects besides tensors and train.py\'s arguments ({found.group(1)}); they are '
            f'not loaded, since unpickling them could run any code. Use a checkpoint of timm\'s train.py, or a '
            f'state dict saved with torch.save(model.state_dict(), PATH).') from None
    except Exception as e:  # torch.load raises many kinds of error for a file that is no checkpoint at all
        raise RunError(f'{path} is not a checkpoint torch.load can read ({type(e).__name__}: {e})') from None


def read_train_args(path: Path) -> Namespace:
    """train.py's arguments from the ``args.yaml`` it writes into its output folder."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f'cannot read the training arguments {path}: {e}') from None
    if not isinstance(values, dict):
        raise RunError(f'{path} is not an args.yaml of timm\'s train.py')
    return Namespace(**values)


def read_train_run(path: Path, weights: str = 'auto', train_args: Optional[Path] = None) -> TrainRun:
    """The weights to export and what the run says about itself.

    ``weights``: 'auto' (EMA if present), 'ema' or 'model'. A bare state dict is taken as it is. ``train_args``:
    an ``args.yaml`` of train.py, for a checkpoint without arguments (or to replace them).
    """
    path = Path(path)
    checkpoint = _load(path)
    if not isinstance(checkpoint, dict):
        raise RunError(f'{path} does not hold a state dict or a timm training checkpoint')
    args = read_train_args(train_args) if train_args else None
    if 'state_dict' not in checkpoint and 'state_dict_ema' not in checkpoint:
        if weights == 'ema':
            raise RunError(f'{path} is a bare state dict: it has no EMA weights')
        return TrainRun(clean_state_dict(checkpoint), args, getattr(args, 'model', '') or '', 'state dict')
    has_ema = checkpoint.get('state_dict_ema') is not None
    if weights == 'ema' and not has_ema:
        raise RunError(f'{path} has no EMA weights (state_dict_ema); train with --model-ema or pass --weights model')
    key = 'state_dict_ema' if has_ema and weights in ('auto', 'ema') else 'state_dict'
    args = args or checkpoint.get('args')
    model = checkpoint.get('arch') or getattr(args, 'model', '') or ''
    return TrainRun(clean_state_dict(checkpoint[key]), args, model, key)


def start_cfg(model_name: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """The architecture, pretrained cfg and model args that ``--model model_name`` stands for in train.py.

    A registered name or ``name.tag``: timm's registry. ``local-dir:DIR``: DIR's config.json. ``hf-hub:ORG/NAME``:
    its config.json in the Hugging Face cache (train.py downloaded it).
    """
    source, model_id = parse_model_name(model_name)
    if source:
        folder = Path(model_id)
        if source == 'hf-hub':
            repo_id, revision = hf_split(model_id)
            cached = try_to_load_from_cache(repo_id, 'config.json', revision=revision)
            folder = Path(cached).parent if isinstance(cached, str) else None
        if folder is None or not (folder / 'config.json').is_file():
            raise RunError(f'the run was trained from {model_name}, whose config.json is not here (moved, or '
                           f'not in the Hugging Face cache): pass --model with its architecture')
        cfg, arch, model_args = load_model_config_from_path(folder)
        if not is_model(arch):
            raise RunError(f'{folder / "config.json"} names architecture {arch!r}, which timm does not know')
        model_args = {**_recorded_scale(arch, {'source': 'local-dir', 'file': str(folder)}), **(model_args or {})}
        return arch, {k: v for k, v in cfg.items() if k not in SOURCE_KEYS}, model_args
    arch, tag = split_model_name_tag(model_id)
    if not is_model(arch):
        raise RunError(f'unknown model {model_id!r}: pass --model with its architecture (timm.list_models())')
    cfg = get_pretrained_cfg(model_id) if tag else get_pretrained_cfg(arch)
    if cfg is None:
        raise RunError(f'{model_id} is not a pretrained cfg timm knows: pass --model with its architecture')
    return arch, cfg.to_dict(remove_source=True), _recorded_scale(arch, cfg.to_dict()) if tag else {}


def _recorded_scale(arch: str, cfg: Dict[str, Any]) -> Dict[str, float]:
    """The gate scale a checkpoint was trained with (:func:`pretrained.recorded_gate_scale`), as model args: the
    model a run names is rebuilt with it (validate --checkpoint, export). Only for this package's gated models, not
    its CIFAR ResNets, registered beside them."""
    ours = list_models(module='denseresnet') + list_models(module='densemobilenet')
    scale = recorded_gate_scale(cfg) if arch in ours and arch.startswith(('dense', 'test_dense')) else None
    return {} if scale is None else {'gate_logit_scale': scale}


def _per_channel(values: Sequence[float], chans: int) -> Tuple[float, ...]:
    # resolve_data_config repeats a single mean/std for 3 channels unless told the channel count
    values = tuple(float(v) for v in values)
    return values[:1] * chans if len(values) != chans and len(set(values)) == 1 else values


def run_data_config(args: Optional[Namespace], start: Dict[str, Any]) -> Dict[str, Any]:
    """The data config and class count the run evaluated with: train.py's arguments over the pretrained cfg of
    its ``--model`` (timm's ``resolve_data_config``, as train.py calls it)."""
    data = resolve_data_config(vars(args) if args is not None else {}, pretrained_cfg=start)
    chans = data['input_size'][0]
    return dict(
        num_classes=(getattr(args, 'num_classes', None) if args is not None else None) or start.get('num_classes'),
        input_size=tuple(data['input_size']), mean=_per_channel(data['mean'], chans),
        std=_per_channel(data['std'], chans), crop_pct=data['crop_pct'], crop_mode=data['crop_mode'],
        interpolation=data['interpolation'])


def class_names(data_dir: Path, split: str = 'train', class_map: str = '') -> List[str]:
    """The label names train.py's ImageFolder gave the classes: its class folders (or class map) in label order."""
    dataset = create_dataset('', root=str(data_dir), split=split, class_map=class_map or None)
    class_to_idx = dataset.reader.class_to_idx
    return [name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]


def run_class_names(args: Optional[Namespace], data_dir: Optional[Path]) -> Optional[List[str]]:
    """Label names from ``data_dir`` (given), else from the run's own training folder if it is still there."""
    if data_dir is None:
        if args is None or getattr(args, 'dataset', '') not in ('', None) or not getattr(args, 'data_dir', None):
            return None
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            return None
    elif not Path(data_dir).is_dir():
        raise RunError(f'--data-dir {data_dir}: no such folder')
    return class_names(Path(data_dir), getattr(args, 'train_split', None) or 'train',
                       getattr(args, 'class_map', '') or '')
