"""Run timm's own `train.py` / `validate.py`, unchanged, with this package's models registered.

timm ships those scripts in its repository, not in the wheel, so they are found (in this order):

1. `--timm-repo DIR` (taken out of the arguments before they reach the script), else env `TIMM_REPO`: a
   pytorch-image-models checkout; a warning is shown when its version differs from the installed timm;
2. the cache, `$TIMM_DENSERES_CACHE/v{version}/` or `~/.cache/timm_denseres/scripts/v{version}/`;
3. a one-time download of the files of tag `v{timm.__version__}` into that cache
   (base URL overridable with env `TIMM_DENSERES_SCRIPTS_URL`).

Every other argument goes to the script as given, so the scripts' own documentation applies, and
`torchrun --nproc_per_node=2 scripts/train.py ...` works: each rank runs the script. Where the user set them
neither on the command line nor in a `--config` file, a few flags are added that the scripts' own defaults get
wrong here (:func:`default_args`):

- `--device cpu` when CUDA is not available (the scripts default to `cuda` and stop with "Found no NVIDIA driver");
- `--in-chans C` when the model's pretrained cfg (a tag, a `local-dir:` folder, a cached `hf-hub:` repo) has C != 3
  input channels: the scripts build a 3-channel model but take the input size, and so the image mode, from that cfg;
- validate.py with `--checkpoint` of a train.py run: the model, class count and data config (input size, mean/std,
  crop_pct, interpolation) of that run, read from the checkpoint.

train.py of a dense model also writes the gates' telemetry, `gates.csv` beside its `summary.csv`, one set of rows
per evaluated epoch (:class:`timm_denseres.gate_stats.GateTelemetry`).
"""
import os
import re
import runpy
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Set, Tuple

import timm
import torch
import yaml

from .gate_stats import GateTelemetry, dense_gates
from .train_run import RunError, read_train_run, run_data_config, start_cfg

# Importing anything from this module has already run timm_denseres/__init__.py, which registers the models
# with timm's registry: that is all the scripts need to find them by name.

__all__ = ['TimmScriptError', 'resolve_script', 'run_script', 'default_args', 'main', 'train_main',
           'validate_main', 'unknown_recipe_keys']

SCRIPT_NAMES = ('train', 'validate')
DEFAULT_URL_BASE = 'https://raw.githubusercontent.com/huggingface/pytorch-image-models'
DOWNLOAD_TIMEOUT_S = 10.0
REPO_FLAG = '--timm-repo'
ENV_REPO = 'TIMM_REPO'
ENV_CACHE = 'TIMM_DENSERES_CACHE'
ENV_URL = 'TIMM_DENSERES_SCRIPTS_URL'


class TimmScriptError(RuntimeError):
    """timm's script could not be found or fetched; the message says what to set."""


def cache_dir(version: str) -> Path:
    root = os.environ.get(ENV_CACHE)
    base = Path(root) if root else Path.home() / '.cache' / 'timm_denseres' / 'scripts'
    return base / f'v{version}'


def script_url(name: str, version: str, url_base: Optional[str] = None) -> str:
    base = url_base or os.environ.get(ENV_URL) or DEFAULT_URL_BASE
    return f'{base.rstrip("/")}/v{version}/{name}.py'


def checkout_version(repo: Path) -> Optional[str]:
    """The `__version__` in a pytorch-image-models checkout's timm/version.py (None if unreadable)."""
    try:
        text = (repo / 'timm' / 'version.py').read_text()
    except OSError:
        return None
    match = re.search(r'''__version__\s*=\s*['"]([^'"]+)['"]''', text)
    return match.group(1) if match else None


def script_from_checkout(repo: Path, name: str, version: str) -> Path:
    script = repo / f'{name}.py'
    if not script.is_file():
        raise TimmScriptError(f'{script} not found: {REPO_FLAG} / {ENV_REPO} must point at a '
                              f'pytorch-image-models checkout (tag v{version})')
    found = checkout_version(repo)
    if found != version:
        # A warning, not an error: scripts of nearby versions usually run, and a dev checkout may be wanted.
        found_text = f'is timm {found}' if found else 'has no readable timm/version.py'
        warnings.warn(f'{repo} {found_text}, but the installed timm is {version}; its {name}.py may not match. '
                      f'Check out tag v{version} to be sure.', stacklevel=2)
    return script


def _unavailable(name: str, version: str, why: str) -> TimmScriptError:
    return TimmScriptError(
        f"timm's {name}.py for timm {version} is not available: {why}.\n"
        f'Set {ENV_REPO}=DIR (or pass {REPO_FLAG} DIR) to a pytorch-image-models checkout of tag v{version}:\n'
        f'    git clone --depth 1 --branch v{version} https://github.com/huggingface/pytorch-image-models')


def download_script(name: str, version: str, dest: Path, url_base: Optional[str] = None,
                    timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `{name}.py` of tag v{version} into dest/; raise TimmScriptError when that fails."""
    url = script_url(name, version, url_base)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            source = response.read()
        compile(source, url, 'exec')  # catches proxies' HTML error pages saved as .py
    except (OSError, SyntaxError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise _unavailable(name, version, f'downloading {url} failed ({e})') from e
    dest.mkdir(parents=True, exist_ok=True)
    # Write then rename, so ranks started together by torchrun never read a half-written file.
    with tempfile.NamedTemporaryFile(dir=dest, prefix=f'.{name}.', suffix='.tmp', delete=False) as f:
        f.write(source)
    target = dest / f'{name}.py'
    os.replace(f.name, target)
    return target


def resolve_script(name: str, timm_repo: Optional[str] = None, version: Optional[str] = None,
                   url_base: Optional[str] = None, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Path of timm's `{name}.py`: explicit checkout > env TIMM_REPO > cache > download into the cache."""
    if name not in SCRIPT_NAMES:
        raise ValueError(f'unknown timm script {name!r}, expected one of {SCRIPT_NAMES}')
    version = version or timm.__version__
    repo = timm_repo or os.environ.get(ENV_REPO)
    if repo:
        return script_from_checkout(Path(repo).expanduser(), name, version)
    cached = cache_dir(version) / f'{name}.py'
    if cached.is_file():
        return cached
    return download_script(name, version, cache_dir(version), url_base, timeout)


def pop_timm_repo(args: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """Take `--timm-repo DIR` / `--timm-repo=DIR` out of args; the rest keep their order."""
    repo, rest = None, []
    it = iter(args)
    for arg in it:
        if arg == REPO_FLAG:
            repo = next(it, None)
            if repo is None:
                raise TimmScriptError(f'{REPO_FLAG} needs a directory')
        elif arg.startswith(REPO_FLAG + '='):
            repo = arg.split('=', 1)[1]
        else:
            rest.append(arg)
    return repo, rest


def allow_cpu_ddp() -> None:
    """Let `torchrun` train on CPU (gloo): timm's train.py (up to at least 1.0.28) always calls
    `task.prepare_distributed(device_ids=[device])`, and PyTorch's DDP rejects device_ids for CPU modules.
    For CPU devices only, the tasks' prepare_distributed drops device_ids; GPU runs are untouched."""
    import torch
    import timm.task

    pending = [timm.task.TrainingTask]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        original = vars(cls).get('prepare_distributed')
        if original is None or getattr(original, 'drops_cpu_device_ids', False):
            continue

        def prepare_distributed(self, device_ids=None, _original=original, **ddp_kwargs):
            if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
                device_ids = None
            return _original(self, device_ids=device_ids, **ddp_kwargs)

        prepare_distributed.drops_cpu_device_ids = True
        cls.prepare_distributed = prepare_distributed


def _is_given(args: Sequence[str], *flags: str) -> bool:
    return any(arg == flag or arg.startswith(flag + '=') for arg in args for flag in flags)


def _value(args: Sequence[str], *flags: str) -> Optional[str]:
    """The value of the last ``--flag VALUE`` or ``--flag=VALUE`` in args."""
    value = None
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + '='):
                value = arg.split('=', 1)[1]
    return value


def _recipe(name: str, args: Sequence[str]) -> dict:
    """The keys of train.py's ``--config`` YAML (train.py reports a file it cannot read)."""
    path = _value(args, '-c', '--config') if name == 'train' else None
    try:
        config = yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _checkpoint_args(args: Sequence[str], given: Callable[..., bool]) -> List[str]:
    """validate.py's model, class and data flags from the run of a train.py ``--checkpoint``, those the user left
    out."""
    path = _value(args, '--checkpoint')
    if not path or not Path(path).is_file():
        return []
    try:
        run = read_train_run(Path(path))
        if run.args is None or not run.model:
            return []
        model = _value(args, '--model', '-m') or run.model
        data = run_data_config(run.args, start_cfg(model)[1])
    except RunError:
        return []  # validate.py says what is wrong with the file
    extra = [] if given('model', '--model', '-m') else ['--model', run.model]
    values = {'--num-classes': [data['num_classes']], '--input-size': data['input_size'], '--mean': data['mean'],
              '--std': data['std'], '--crop-pct': [data['crop_pct']], '--interpolation': [data['interpolation']],
              '--crop-mode': [data['crop_mode']]}
    chans = _value(args, '--in-chans')
    if chans:  # the user's channel count, the run's image size
        values['--input-size'] = (chans, *values['--input-size'][1:])
    for flag, value in values.items():
        blocked = ('--img-size',) if flag == '--input-size' else ()
        if not given(flag[2:].replace('-', '_'), flag, *blocked):
            extra += [flag, *map(str, value)]
    return extra


def _model_in_chans(model: str) -> Optional[int]:
    try:
        return int(start_cfg(model)[1]['input_size'][0])
    except (RunError, KeyError, TypeError, ValueError):
        return None  # the script reports a model it cannot build


def default_args(name: str, args: Sequence[str]) -> List[str]:
    """Flags to add to ``args`` for timm's ``name`` script (see the module docstring); empty when none is needed."""
    recipe = _recipe(name, args)

    def given(dest: str, *flags: str) -> bool:
        return dest in recipe or _is_given(args, *flags)

    extra = []
    if not given('device', '--device') and not torch.cuda.is_available():
        extra += ['--device', 'cpu']
    if name == 'validate':
        extra += _checkpoint_args(args, given)
    if not (given('in_chans', '--in-chans') or given('input_size', '--input-size') or _is_given(extra, '--input-size')):
        model = _value(args, '--model', '-m') or recipe.get('model')
        chans = _model_in_chans(model) if model else None
        if chans and chans != 3:
            extra += ['--in-chans', str(chans)]
    return extra


def run_script(script: Path, args: Sequence[str]) -> None:
    """Run a script file as `python script args...` would, in this process (models stay registered)."""
    saved_argv = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name='__main__')
    finally:
        sys.argv = saved_argv


@contextmanager
def gate_telemetry() -> Iterator[None]:
    """While train.py runs: the first dense model it creates is followed by a :class:`GateTelemetry`, written
    into the run's folder whenever train.py adds an epoch to its summary.csv (rank 0). train.py calls both
    functions by the names it imports from timm, which are swapped here for the run and restored after."""
    import timm.models
    import timm.utils

    create_model, update_summary = timm.models.create_model, timm.utils.update_summary
    followed: List[GateTelemetry] = []

    def create_and_follow(*args, **kwargs):
        model = create_model(*args, **kwargs)
        if not followed and dense_gates(model):
            followed.append(GateTelemetry(model))
        return model

    def update_and_write(epoch, *args, **kwargs):
        update_summary(epoch, *args, **kwargs)
        filename = kwargs['filename'] if 'filename' in kwargs else args[2]
        if followed:
            followed[0].write(epoch, Path(filename).parent)

    timm.models.create_model, timm.utils.update_summary = create_and_follow, update_and_write
    try:
        yield
    finally:
        timm.models.create_model, timm.utils.update_summary = create_model, update_summary
        for telemetry in followed:
            telemetry.detach()


def main(name: str, args: Optional[Sequence[str]] = None) -> None:
    args = sys.argv[1:] if args is None else args
    try:
        repo, rest = pop_timm_repo(args)
        script = resolve_script(name, repo)
    except TimmScriptError as e:
        sys.exit(f'error: {e}')
    if name == 'train':
        allow_cpu_ddp()
        with gate_telemetry():
            run_script(script, [*rest, *default_args(name, rest)])
    else:
        run_script(script, [*rest, *default_args(name, rest)])


def train_main() -> None:
    main('train')


def validate_main() -> None:
    main('validate')


@lru_cache(maxsize=None)
def train_arg_dests(train_script: Path) -> Set[str]:
    """Destination names of train.py's argparse options: the keys its --config YAML may set."""
    # Runs the module body only (not main): train.py builds its parser at import time.
    namespace = runpy.run_path(str(train_script), run_name='timm_train_inspect')
    return {action.dest for action in namespace['parser']._actions} - {'help'}


def unknown_recipe_keys(recipe: Path, train_script: Path) -> List[str]:
    """Keys of a --config YAML that train.py would silently ignore (typos, renamed flags)."""
    import yaml  # a timm dependency

    with open(recipe) as f:
        config = yaml.safe_load(f) or {}
    return sorted(set(config) - train_arg_dests(train_script))
