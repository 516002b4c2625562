"""Report --config keys that timm's train.py would silently ignore (it loads the YAML as parser defaults).

    python tools/check_recipes.py --timm-repo /path/to/pytorch-image-models recipes/*.yaml
"""
import argparse
import sys
from pathlib import Path

from timm_denseres.timm_scripts import resolve_script, unknown_recipe_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('recipes', nargs='+', type=Path)
    parser.add_argument('--timm-repo', default=None, help='pytorch-image-models checkout (default: TIMM_REPO / cache)')
    args = parser.parse_args()
    train_script = resolve_script('train', args.timm_repo)
    failed = False
    for recipe in args.recipes:
        unknown = unknown_recipe_keys(recipe, train_script)
        failed |= bool(unknown)
        print(f'{recipe}: ' + (f'UNKNOWN KEYS {unknown}' if unknown else 'ok'))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
