"""Write scikit-learn's digits (1 797 handwritten 8x8 digits, shipped inside scikit-learn) as a timm ImageFolder
of 28x28 grayscale PNGs: a small new dataset to fine-tune a Fashion-MNIST checkpoint on.

    python scripts/prepare_digits.py --out data/digits

Every fifth image (by index) goes to `validation/`, the rest to `train/`; class folders are `0`..`9`.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

try:
    from sklearn.datasets import load_digits
except ImportError:  # not a dependency of the package, nor of its tests
    raise SystemExit('prepare_digits.py needs scikit-learn, which ships the digits: pip install scikit-learn '
                     '(or pip install -e ".[extras]")') from None

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=REPO_ROOT / 'data' / 'digits')
    parser.add_argument('--size', type=int, default=28, help='output side in pixels (Fashion-MNIST is 28)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    args = parser.parse_args()

    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f'{args.out} is not empty; pass --overwrite to replace it')
        shutil.rmtree(args.out)
    digits = load_digits()
    # pixel values are 0..16; scale to 0..255 and upsample smoothly to the network's input size
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    for index, (image, label) in enumerate(tqdm(zip(images, digits.target), total=len(images), unit='img')):
        split = 'validation' if index % 5 == 0 else 'train'
        folder = args.out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, 'L').resize((args.size, args.size), Image.BILINEAR).save(folder / f'{index:04d}.png')
    for split in ('train', 'validation'):
        print(f'{split}: {sum(1 for _ in (args.out / split).rglob("*.png"))} images in {args.out / split}')


if __name__ == '__main__':
    main()
