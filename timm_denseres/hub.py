"""Publishing a checkpoint folder on the Hugging Face Hub: stage it, check it, upload it.

:func:`publish` (``scripts/publish.py``) first copies the folder to a staging folder named after the repo and
checks it there (:func:`check`): exactly config.json, model.safetensors and README.md; the config names a
registered architecture and the ``{model}.{tag}`` of the repo, and carries the sha256 of the weights; the card has
the Hub metadata (library_name timm, license, metrics); ``timm.create_model('local-dir:<staged>', pretrained=True)``
loads it. A repo of the project's organisation (``timm-denseres/...``) must also have its line in
``timm_denseres.pretrained.PUBLISHED`` with that sha256 (required to upload, a warning in a dry run); a repo of
your own (``--repo-id ORG/NAME``) needs none. ``dry_run`` stops there: the staged folder is exactly what would be
uploaded. Otherwise it is uploaded with huggingface_hub (``create_repo`` + ``upload_folder``; log in with
``hf auth login`` or set ``HF_TOKEN``).
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import timm
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from timm.models import is_model

from .export import add_export_arguments, export_from_args
from .pretrained import (
    CONFIG_SHA256_KEY, HUB_FILES, HUB_ORG, PUBLISHED, WEIGHTS_FILE, PretrainedWeightsError, hub_repo_id, sha256_file)
from .train_run import RunError

__all__ = ['PublishError', 'stage', 'check', 'publish', 'main']

DEFAULT_STAGING = Path('build') / 'hub'
CARD_FIELDS = ('library_name', 'license', 'metrics')


class PublishError(RuntimeError):
    """The folder is not fit to publish; the message says why."""


def stage(folder: Path, staging_dir: Path, repo_name: str) -> Path:
    """Copy the checkpoint files of ``folder`` to ``staging_dir/repo_name`` (replacing an earlier staging)."""
    if not folder.is_dir():
        raise PublishError(f'{folder}: no such folder')
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


def _check_checksums(folder: Path, config: dict, repo_id: str, require_recorded: bool) -> List[str]:
    """The config.json's sha256 must be the file's; a project repo's must also be its line in PUBLISHED."""
    sha256 = sha256_file(folder / WEIGHTS_FILE)
    in_config = config.get(CONFIG_SHA256_KEY)
    if in_config is None:
        raise PublishError(f'config.json has no {CONFIG_SHA256_KEY}: export the checkpoint again with '
                           f'scripts/export_checkpoint.py (it records the checksum that every load checks)')
    if in_config != sha256:
        raise PublishError(f'{WEIGHTS_FILE} has sha256 {sha256}, but config.json records {in_config}: the weights '
                           f'were changed after the export')
    org, _, repo_name = repo_id.rpartition('/')
    recorded = PUBLISHED.get(repo_name)
    if org != HUB_ORG:
        return []
    if recorded is None:
        message = (f'{repo_name} has no line in PUBLISHED (timm_denseres/pretrained.py); add\n'
                   f"    '{repo_name}': Published('<dataset>', '{sha256}'),")
        if require_recorded:
            raise PublishError(message + '\nand release that version before users load the upload.')
        return [message]
    if recorded.sha256 != sha256:
        raise PublishError(f'{WEIGHTS_FILE} has sha256 {sha256}, but PUBLISHED records {recorded.sha256} for '
                           f'{repo_name}')
    return []


def check(folder: Path, repo_id: str, require_recorded: bool) -> List[str]:
    """Everything a published checkpoint must satisfy; returns warnings, raises PublishError on a failure."""
    repo_name = repo_id.rpartition('/')[2]
    try:
        config = json.loads((folder / 'config.json').read_text())
    except ValueError as e:
        raise PublishError(f'{folder / "config.json"} is not valid JSON ({e})') from None
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
    warnings = _check_checksums(folder, config, repo_id, require_recorded)

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
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id):
        raise PublishError(f'repo id {repo_id!r}: expected ORG/NAME')
    staged = stage(folder, Path(staging_dir), repo_id.rpartition('/')[2])
    for warning in check(staged, repo_id, require_recorded=not dry_run):
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
    info = api.upload_folder(repo_id=repo_id, folder_path=staged, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or f'Add {repo_id.rpartition("/")[2]}')
    print(f'uploaded: {info}')
    return staged


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n'
               '  python scripts/publish.py weights/denseresnet110_n4.fmnist --dry-run\n'
               '  python scripts/publish.py weights/denseresnet20_n4.digits --repo-id me/denseresnet20_n4.digits')
    parser.add_argument('folder', type=Path, nargs='?',
                        help='a checkpoint folder (config.json, model.safetensors, README.md)')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='a train.py checkpoint instead of a folder: exported into the staging dir first '
                             '(the options below as for scripts/export_checkpoint.py)')
    parser.add_argument('--repo-id', default=None, help=f'ORG/NAME (default: {HUB_ORG}/<folder name>)')
    parser.add_argument('--dry-run', action='store_true', help='write and check the staged folder, upload nothing')
    parser.add_argument('--staging-dir', type=Path, default=DEFAULT_STAGING, help=f'default: {DEFAULT_STAGING}')
    parser.add_argument('--private', action='store_true')
    parser.add_argument('--revision', default=None, help='branch to push to (default: main)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of pushing')
    parser.add_argument('--commit-message', default=None)
    add_export_arguments(parser.add_argument_group('with --checkpoint'))
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.checkpoint is None):
        parser.error('give a folder or --checkpoint (one of them)')
    if args.checkpoint is not None and not args.tag:
        parser.error('--checkpoint needs --tag')
    try:
        folder = args.folder
        if args.checkpoint is not None:
            folder = export_from_args(args, args.staging_dir, args.repo_id, overwrite=True)
        publish(folder, args.repo_id, args.dry_run, args.staging_dir, args.private, args.revision, args.create_pr,
                args.commit_message)
    except (PublishError, RunError, PretrainedWeightsError) as e:
        sys.exit(f'error: {e}')
