"""Push a checkpoint folder (or a trained checkpoint, exported first) to the Hugging Face Hub.

    python scripts/publish.py weights/denseresnet110_n4.fmnist --dry-run     # stage and check only, no network
    python scripts/publish.py weights/denseresnet110_n4.fmnist               # -> timm-denseres/denseresnet110_n4.fmnist
    python scripts/publish.py --checkpoint runs/fmnist/denseresnet110_n4/model_best.pth.tar --tag fmnist --dry-run

The folder is first copied to a staging folder (``--staging-dir``, default ``build/hub``), named after the repo,
and checked there: exactly config.json, model.safetensors and README.md; the config names a registered
architecture and the ``{model}.{tag}`` of the repo; the card has the Hub metadata (library_name timm, license,
datasets, metrics); the sha256 is the one recorded in ``timm_denseres.pretrained.SHA256`` (required to upload,
a warning in a dry run); and ``timm.create_model('local-dir:<staged>', pretrained=True)`` loads it. ``--dry-run``
stops there: the staged folder is exactly what would be uploaded. Otherwise it is uploaded with
huggingface_hub (``create_repo`` + ``upload_folder``; log in with ``hf auth login`` or set ``HF_TOKEN``).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import timm
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from timm.models import is_model

from timm_denseres.pretrained import (
    HUB_FILES, HUB_ORG, SHA256, WEIGHTS_FILE, PretrainedWeightsError, hub_repo_id, sha256_file)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_checkpoint import ExportError, export  # noqa: E402  (a sibling script)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STAGING = REPO_ROOT / 'build' / 'hub'
CARD_FIELDS = ('library_name', 'license', 'datasets', 'metrics')


class PublishError(RuntimeError):
    """The folder is not fit to publish; the message says why."""


def stage(folder: Path, staging_dir: Path, repo_name: str) -> Path:
    """Copy the checkpoint files of ``folder`` to ``staging_dir/repo_name`` (replacing an earlier staging)."""
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    extra = sorted(p.name for p in folder.iterdir() if p.name not in HUB_FILES)
    if missing or extra:
        raise PublishError(f'{folder} must hold exactly {", ".join(HUB_FILES)}'
                           + (f'; missing: {", ".join(missing)}' if missing else '')
                           + (f'; not a checkpoint file: {", ".join(extra)}' if extra else ''))
    dest = staging_dir / repo_name
    if dest.resolve() != folder.resolve():
        if dest.exists():
            if any(p.name not in HUB_FILES for p in dest.iterdir()):
                raise PublishError(f'{dest} exists and holds other files: not replacing it')
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for name in HUB_FILES:
            shutil.copy2(folder / name, dest / name)
    return dest


def check(folder: Path, repo_name: str, require_checksum: bool) -> List[str]:
    """Everything a published checkpoint must satisfy; returns warnings, raises PublishError on a failure."""
    warnings = []
    config = json.loads((folder / 'config.json').read_text())
    arch, tag = config.get('architecture'), config.get('pretrained_cfg', {}).get('tag')
    if not arch or not is_model(arch):
        raise PublishError(f'config.json names architecture {arch!r}, which timm_denseres does not register')
    if f'{arch}.{tag}' != repo_name:
        raise PublishError(f'config.json is for {arch}.{tag}, but the repo is {repo_name}: the repo name must be '
                           f'{{model}}.{{tag}} of its config (checksums are recorded under it)')

    card = ModelCard.load(folder / 'README.md')
    absent = [f for f in CARD_FIELDS if not getattr(card.data, f, None)]
    if absent:
        raise PublishError(f'README.md lacks Hub metadata: {", ".join(absent)}')
    if card.data.library_name != 'timm':
        raise PublishError(f'README.md says library_name {card.data.library_name!r}, not timm')

    sha256 = sha256_file(folder / WEIGHTS_FILE)
    recorded = SHA256.get(repo_name)
    if recorded is None:
        message = (f'no sha256 recorded for {repo_name} in timm_denseres/pretrained.py SHA256; add\n'
                   f"    '{repo_name}': '{sha256}',")
        if require_checksum:
            raise PublishError(message + '\nand release that version before users load the upload.')
        warnings.append(message)
    elif recorded != sha256:
        raise PublishError(f'{WEIGHTS_FILE} has sha256 {sha256}, but {recorded} is recorded for {repo_name}')

    # the folder must load the way users will load it (runs the checksum and fit checks too)
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    except PretrainedWeightsError as e:
        raise PublishError(f'{folder} does not load: {e}') from e
    with torch.no_grad():
        out = model(torch.zeros(1, *model.pretrained_cfg['input_size']))
    if not torch.isfinite(out).all():
        raise PublishError(f'{folder} gives non-finite logits')
    return warnings


def publish(
        folder: Path,
        repo_id: Optional[str] = None,
        dry_run: bool = False,
        staging_dir: Path = DEFAULT_STAGING,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: Optional[str] = None,
) -> Path:
    """Stage and check ``folder``; upload it unless ``dry_run``. Returns the staged folder."""
    folder = Path(folder)
    repo_id = repo_id or hub_repo_id(folder.name)
    repo_name = repo_id.split('/')[-1]
    staged = stage(folder, Path(staging_dir), repo_name)
    for warning in check(staged, repo_name, require_checksum=not dry_run):
        print(f'warning: {warning}', file=sys.stderr)
    print(f'{repo_id}: ' + ', '.join(f'{p.name} ({p.stat().st_size} bytes)' for p in sorted(staged.iterdir())))
    print(f'sha256({WEIGHTS_FILE}) = {sha256_file(staged / WEIGHTS_FILE)}')
    if dry_run:
        print(f'dry run: staged in {staged}, nothing uploaded')
        return staged
    if hf_constants.HF_HUB_OFFLINE:
        raise PublishError('HF_HUB_OFFLINE is set: uploading needs the Hub (use --dry-run to stage only)')
    api = HfApi()
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=staged, revision=revision, create_pr=create_pr,
        commit_message=commit_message or f'Add {repo_name}')
    print(f'uploaded: {info}')
    return staged


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', type=Path, nargs='?',
                        help='a weights/ folder (config.json, model.safetensors, README.md)')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='a train.py checkpoint instead of a folder: exported (scripts/export_checkpoint.py) into '
                             'the staging dir first')
    parser.add_argument('--tag', default=None, help='with --checkpoint: the pretrained tag, e.g. fmnist')
    parser.add_argument('--model', default=None, help='with --checkpoint: model name (default: its arch)')
    parser.add_argument('--weights', choices=('auto', 'ema', 'model'), default='auto', help='with --checkpoint')
    parser.add_argument('--top1', type=float, default=None, help='with --checkpoint: for the card')
    parser.add_argument('--top5', type=float, default=None, help='with --checkpoint: for the card')
    parser.add_argument('--train-command', default=None, help='with --checkpoint: for the card')
    parser.add_argument('--eval-command', default=None, help='with --checkpoint: for the card')
    parser.add_argument('--repo-id', default=None, help=f'default: {HUB_ORG}/<folder name>')
    parser.add_argument('--dry-run', action='store_true', help='write and check the staged folder, upload nothing')
    parser.add_argument('--staging-dir', type=Path, default=DEFAULT_STAGING, help=f'default: {DEFAULT_STAGING}')
    parser.add_argument('--private', action='store_true')
    parser.add_argument('--revision', default=None, help='branch to push to (default: main)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of pushing')
    parser.add_argument('--commit-message', default=None)
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.checkpoint is None):
        parser.error('give a folder or --checkpoint (one of them)')
    try:
        folder = args.folder
        if args.checkpoint is not None:
            if not args.tag:
                parser.error('--checkpoint needs --tag')
            folder = export(args.checkpoint, args.tag, args.model, args.weights, args.staging_dir, args.top1,
                            args.top5, args.train_command, args.eval_command, overwrite=True)
        publish(folder, args.repo_id, args.dry_run, args.staging_dir, args.private, args.revision, args.create_pr,
                args.commit_message)
    except (PublishError, ExportError, PretrainedWeightsError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
