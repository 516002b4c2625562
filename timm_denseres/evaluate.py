"""Classify an ImageFolder with timm's own data pipeline (the transforms a model's pretrained_cfg asks for)."""
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.nn as nn
from timm.data import create_dataset, create_loader, resolve_data_config

__all__ = ['EvalResult', 'make_loader', 'evaluate']


@dataclass
class EvalResult:
    top1: float  # percent
    count: int
    predictions: List[int]
    targets: List[int]
    class_names: List[str]


def make_loader(model: nn.Module, root: str, split: str = 'validation', batch_size: int = 64,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A timm eval loader over ``root/split/<class>/*`` with the model's data config."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f'No image folder at {split_dir!r}: expected {root}/{split}/<class name>/<images>. '
            'See scripts/prepare_fashion_mnist.py to make one.')
    config = resolve_data_config(model=model)
    mode = 'L' if config['input_size'][0] == 1 else 'RGB'
    dataset = create_dataset('', root=root, split=split, input_img_mode=mode)
    if len(dataset) == 0:
        raise FileNotFoundError(f'{split_dir!r} holds no images')
    return create_loader(
        dataset,
        input_size=config['input_size'],
        batch_size=batch_size,
        interpolation=config['interpolation'],
        mean=config['mean'],
        std=config['std'],
        crop_pct=config['crop_pct'],
        crop_mode=config.get('crop_mode', 'center'),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        use_prefetcher=False,
        device=torch.device('cpu'),
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, progress: Optional[callable] = None) -> EvalResult:
    """Top-1 accuracy and the predictions of ``model`` (put in eval mode) over ``loader``."""
    model.eval()
    predictions, targets = [], []
    batches = progress(loader) if progress else loader
    for images, labels in batches:
        predictions += model(images).argmax(1).tolist()
        targets += labels.tolist()
    correct = sum(p == t for p, t in zip(predictions, targets))
    dataset = getattr(loader, 'dataset', None)
    reader = getattr(dataset, 'reader', None)
    class_names = sorted(reader.class_to_idx, key=reader.class_to_idx.get) if reader is not None else []
    return EvalResult(100.0 * correct / max(len(targets), 1), len(targets), predictions, targets, class_names)
