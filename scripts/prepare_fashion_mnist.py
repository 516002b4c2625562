"""Write Fashion-MNIST as PNG files in the folder layout timm's ImageFolder reads.

    python scripts/prepare_fashion_mnist.py                      # all of it -> data/fashion-mnist
    python scripts/prepare_fashion_mnist.py --train-per-class 600 --val-per-class 100 --out data/fashion-mnist-6k
    python scripts/prepare_fashion_mnist.py --sample             # the committed sample -> data/sample/fashion-mnist

Reads the idx files of Debian's `dataset-fashion-mnist` package. `train/` comes from the train split,
`validation/` from the t10k (test) split. Class folders are named `<label>_<name>`, so their sorted order (which
is how ImageFolder assigns class indices) equals the Fashion-MNIST label index.
"""
import argparse
import gzip
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

DEFAULT_SRC = Path('/usr/share/datasets/fashion-mnist')
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / 'data' / 'fashion-mnist'
SAMPLE_OUT = REPO_ROOT / 'data' / 'sample' / 'fashion-mnist'
SAMPLE_PER_CLASS = 30

CLASS_NAMES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat',
               'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')
# Output split -> Debian file prefix. The test split is named `validation` because that is timm's default
# --val-split, so train.py evaluates on it without extra flags.
SPLITS: Dict[str, str] = {'train': 'train', 'validation': 't10k'}

# idx type codes (third magic byte) -> numpy dtype; multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def class_folder(label: int) -> str:
    """`3_dress`: the label digit first, so sorted folder order is label order."""
    return f'{label}_{CLASS_NAMES[label]}'


def parse_idx(data: bytes) -> np.ndarray:
    """An idx array: 2 zero bytes, a type code, the number of dims, then each dim as a big-endian uint32."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError('not an idx file (bad magic number)')
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f'idx size mismatch: header says {shape}, file has {len(data) - header} data bytes')
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)


def read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        return parse_idx(f.read())


def load_split(src: Path, prefix: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one Debian split ('train' or 't10k')."""
    images_path = src / f'{prefix}-images-idx3-ubyte.gz'
    labels_path = src / f'{prefix}-labels-idx1-ubyte.gz'
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files not found: {", ".join(missing)}. '
            'Install them with `apt-get install dataset-fashion-mnist`, or point --src at a folder holding '
            f'{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz.')
    images, labels = read_idx_gz(images_path), read_idx_gz(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f'unexpected shapes in {src}/{prefix}: images {images.shape}, labels {labels.shape}')
    return images, labels


def select_per_class(labels: np.ndarray, per_class: Optional[int]) -> np.ndarray:
    """Indices of the first `per_class` examples of each class, in file order (all when None)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)


def write_split(images: np.ndarray, labels: np.ndarray, split_dir: Path, per_class: Optional[int]) -> int:
    """PNG files split_dir/<class>/00001.png, numbered per class in file order. Returns the count written."""
    for label in range(len(CLASS_NAMES)):
        (split_dir / class_folder(label)).mkdir(parents=True, exist_ok=True)
    counts = [0] * len(CLASS_NAMES)
    indices = select_per_class(labels, per_class)
    for i in tqdm(indices, desc=split_dir.name, unit='img'):
        label = int(labels[i])
        counts[label] += 1
        Image.fromarray(images[i]).save(split_dir / class_folder(label) / f'{counts[label]:05d}.png')
    return len(indices)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', type=Path, default=DEFAULT_SRC, help='folder with the *-ubyte.gz files')
    parser.add_argument('--out', type=Path, default=None, help=f'output root (default: {DEFAULT_OUT})')
    parser.add_argument('--train-per-class', type=int, default=None, metavar='K',
                        help='write only the first K train images of each class')
    parser.add_argument('--val-per-class', type=int, default=None, metavar='K',
                        help='write only the first K test images of each class')
    parser.add_argument('--sample', action='store_true',
                        help=f'the committed sample: {SAMPLE_PER_CLASS} per class per split -> {SAMPLE_OUT}')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output split folders')
    args = parser.parse_args(argv)

    per_class = {'train': args.train_per_class, 'validation': args.val_per_class}
    out = args.out
    if args.sample:
        out = out or SAMPLE_OUT
        per_class = {split: k or SAMPLE_PER_CLASS for split, k in per_class.items()}
    out = out or DEFAULT_OUT

    # Refuse to mix with an earlier run: stale files from a larger K would silently stay in the dataset.
    existing = [out / split for split in SPLITS if (out / split).exists() and any((out / split).iterdir())]
    if existing and not args.overwrite:
        sys.exit(f'error: {existing[0]} already exists and is not empty; pass --overwrite to replace it')

    # Read every split before touching the output, so a missing file leaves it as it was.
    try:
        loaded = {split: load_split(args.src, prefix) for split, prefix in SPLITS.items()}
    except FileNotFoundError as e:
        sys.exit(f'error: {e}')
    for split_dir in existing:
        shutil.rmtree(split_dir)
    for split, (images, labels) in loaded.items():
        n = write_split(images, labels, out / split, per_class[split])
        print(f'{split}: {n} images from {SPLITS[split]} -> {out / split}')

if __name__ == '__main__':
    main()
