"""Run timm's own scripts, unchanged, with this package's models registered: `train.py`, `validate.py`,
`inference.py`, `benchmark.py`, `onnx_export.py` and `onnx_validate.py`.

timm ships those scripts in its repository, not in the wheel, so they are found (in this order):

1. `--timm-repo DIR` (taken out of the arguments before they reach the script), else env `TIMM_REPO`: a
   pytorch-image-models checkout; a warning is shown when its version differs from the installed timm;
2. the cache, `$TIMM_DENSERES_CACHE/v{version}/` or `~/.cache/timm_denseres/scripts/v{version}/`;
3. a one-time download of the files of tag `v{timm.__version__}` into that cache
   (base URL overridable with env `TIMM_DENSERES_SCRIPTS_URL`).

Every other argument goes to the script as given, so the scripts' own documentation applies, and
`torchrun --nproc_per_node=2 scripts/train.py ...` works: each rank runs the script. Where the user set them
neither on the command line nor in a `--config` file, a few flags are added that the scripts' own defaults get
wrong here (:func:`default_args`), each only to a script that takes it (:data:`SCRIPTS`):

- `--device cpu` when CUDA is not available (the scripts default to `cuda` and stop with "Found no NVIDIA driver");
- `--workers N` on a machine with N CPUs, fewer than the script's default (DataLoader warns on every run);
- `--in-chans C` when the model's pretrained cfg (a tag, a `local-dir:` folder, a cached `hf-hub:` repo) has C != 3
  input channels: the scripts build a 3-channel model but take the input size, and so the image mode, from that cfg;
- benchmark.py and onnx_export.py, which take no `--in-chans`: `--input-size C H W` of such a cfg, or of a
  `local-dir:`/`hf-hub:` one (its config.json gives a list, which they add to a tuple);
- inference.py with a `local-dir:`/`hf-hub:` model: `--results-file NAME-SIZE` (it names the file after `--model`,
  which would put it into a folder called `local-dir:...`);
- validate.py and inference.py with `--checkpoint` of a train.py run: the model, class count and data config
  (input size, mean/std, crop_pct, interpolation) of that run, read from the checkpoint.

Before the script runs, what would end in its traceback is refused in one line (:func:`check_args`): a
`--model` timm does not know (with the closest names) or a `local-dir:` folder without config.json; a weights file
(`--checkpoint`, `--resume`, `--initial-checkpoint`) that is missing, truncated or corrupt; a `--checkpoint` whose
classifier has another class count than the model (with the `--num-classes` to pass). And before timm 1.0.31
onnx_export.py's `--dynamo` is left out on a torch without `torch.onnx.dynamo_export`, which it calls
(:func:`fixed_args`): there (torch 2.9 and newer) `torch.onnx.export`, its default path, is already the
torch.export-based exporter. `--help` shows a line on `--timm-repo` above the script's own help.

While it runs, a few of timm's functions are swapped for ones that fix what the flags cannot (:func:`script_fixes`):

- train.py: CPU DDP (:func:`allow_cpu_ddp`), and a dense model's gate telemetry, `gates.csv` beside its
  `summary.csv`, one set of rows per evaluated epoch (:class:`timm_denseres.gate_stats.GateTelemetry`);
- validate.py: data with more classes than the model has outputs stops with both counts (not an IndexError);
- benchmark.py and onnx_export.py build the model with 3 channels whatever `--input-size` says: it gets its channels;
- inference.py and onnx_validate.py read images as RGB: for a 1-channel model they are read in mode L;
- onnx_export.py: the input size as a tuple, the output's folder made; the ONNX file gets the model's data config
  and labels as metadata (:data:`ONNX_CFG_KEY`), from which onnx_validate.py, which has no model to ask, resolves
  its data config.
"""
import difflib
import json
import os
import re
import runpy
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import timm
import torch
import yaml
from safetensors import SafetensorError, safe_open
from timm.models import parse_model_name

from .gate_stats import GateTelemetry, dense_gates
from .pretrained import PretrainedWeightsError
from .train_run import RunError, TrainRun, read_train_run, run_data_config, start_cfg

# Importing anything from this module has already run timm_denseres/__init__.py, which registers the models
# with timm's registry: that is all the scripts need to find them by name.

__all__ = ['TimmScriptError', 'ArgumentError', 'SCRIPTS', 'resolve_script', 'run_script', 'default_args',
           'fixed_args', 'check_args', 'script_fixes', 'main', 'train_main', 'validate_main', 'inference_main',
           'benchmark_main', 'onnx_export_main', 'onnx_validate_main', 'unknown_recipe_keys']


class Script(NamedTuple):
    """What the defaults depend on in a timm script (its flags at timm 1.0.28)."""
    device: bool  # takes --device, which defaults to cuda
    in_chans: bool  # takes --in-chans (benchmark.py and onnx_export.py build 3 channels, whatever the input size)
    workers: int  # the default of its -j/--workers; 0: it has none


SCRIPTS: Dict[str, Script] = {
    'train': Script(device=True, in_chans=True, workers=4),
    'validate': Script(device=True, in_chans=True, workers=4),
    'inference': Script(device=True, in_chans=True, workers=2),
    'benchmark': Script(device=True, in_chans=False, workers=0),
    'onnx_export': Script(device=False, in_chans=False, workers=0),
    'onnx_validate': Script(device=False, in_chans=False, workers=2),  # no model: the ONNX file has the channels
}
SCRIPT_NAMES = tuple(SCRIPTS)
ONNX_CFG_KEY = 'timm_pretrained_cfg'
"""Metadata key of an ONNX file written by onnx_export.py here: JSON of the model's data config and labels."""
ONNX_CFG_FIELDS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode', 'num_classes',
                   'label_names')
ONNX_MODULES = ('onnx', 'onnxruntime', 'onnxscript')
EXTRA_MODULES = {'pandas': 'pandas', **{module: ' '.join(ONNX_MODULES) for module in ONNX_MODULES}}
"""Modules a script (or torch's ONNX exporter) imports that timm does not install, and what to pip install."""
DEFAULT_URL_BASE = 'https://raw.githubusercontent.com/huggingface/pytorch-image-models'
DOWNLOAD_TIMEOUT_S = 10.0
REPO_FLAG = '--timm-repo'
ENV_REPO = 'TIMM_REPO'
ENV_CACHE = 'TIMM_DENSERES_CACHE'
ENV_URL = 'TIMM_DENSERES_SCRIPTS_URL'


class TimmScriptError(RuntimeError):
    """timm's script could not be found or fetched; the message says what to set."""


class ArgumentError(TimmScriptError):
    """The arguments do not fit the checkpoint or the data; the message says what to pass."""


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


def _input_size(args: Sequence[str]) -> Optional[List[int]]:
    """The last ``--input-size C H W`` in args, or None (the script reports a malformed one)."""
    starts = [i for i, arg in enumerate(args) if arg == '--input-size']
    try:
        size = [int(v) for v in args[starts[-1] + 1:starts[-1] + 4]] if starts else []
    except ValueError:
        return None
    return size if len(size) == 3 else None


def _chans(args: Sequence[str]) -> int:
    """The input channels the script builds its model with: --in-chans, else --input-size's, else 3."""
    size = _input_size(args)
    try:
        return int(_value(args, '--in-chans') or (size[0] if size else 3))
    except ValueError:
        return 3  # the script reports a bad --in-chans


def available_cpus() -> int:
    """The CPUs this process may run on, as DataLoader counts them for its warning on too many workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS or Windows
        return os.cpu_count() or 1


def _recipe(name: str, args: Sequence[str]) -> dict:
    """The keys of train.py's ``--config`` YAML (train.py reports a file it cannot read)."""
    path = _value(args, '-c', '--config') if name == 'train' else None
    try:
        config = yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _checkpoint_args(args: Sequence[str], given: Callable[..., bool]) -> List[str]:
    """validate.py's (inference.py's) model, class and data flags from the run of a train.py ``--checkpoint``, those
    the user left out."""
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
        return []  # the script says what is wrong with the file
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


def _input_size_args(model: str, img_size: Optional[str]) -> List[str]:
    """benchmark.py and onnx_export.py: ``--input-size C H W`` of a cfg with C != 3 channels, or of a config.json
    (a list there, which they add to a tuple); H = W = ``img_size`` when given."""
    try:
        size = start_cfg(model)[1]['input_size']
    except (RunError, KeyError):
        return []  # the script reports a model it cannot build
    if int(size[0]) == 3 and not parse_model_name(model)[0]:
        return []  # a registered cfg: the scripts' own defaults work
    height, width = (img_size, img_size) if img_size else size[1:]
    return ['--input-size', str(size[0]), str(height), str(width)]


def _results_file_args(model: str, args: Sequence[str]) -> List[str]:
    """inference.py names its results ``{--model}-{image size}``: for ``local-dir:DIR`` or ``hf-hub:ORG/NAME`` a path
    into a folder of that name, which does not exist. The folder's (the repo's) own name stands in for it."""
    source, model_id = parse_model_name(model)
    if not source:
        return []
    size = _input_size(args)
    img_size = size[1] if size else _value(args, '--img-size')
    if img_size is None:
        try:
            img_size = start_cfg(model)[1]['input_size'][1]
        except (RunError, KeyError):
            return []  # the script reports a model it cannot build
    return ['--results-file', f'{Path(model_id).name}-{img_size}']


def default_args(name: str, args: Sequence[str]) -> List[str]:
    """Flags to add to ``args`` for timm's ``name`` script (see the module docstring); empty when none is needed."""
    recipe = _recipe(name, args)
    script = SCRIPTS[name]

    def given(dest: str, *flags: str) -> bool:
        return dest in recipe or _is_given(args, *flags)

    extra = []
    if script.device and not given('device', '--device') and not torch.cuda.is_available():
        extra += ['--device', 'cpu']
    cpus = available_cpus()
    if cpus < script.workers and not given('workers', '-j', '--workers'):
        extra += ['--workers', str(cpus)]
    if name in ('validate', 'inference'):
        extra += _checkpoint_args(args, given)
    model = _value([*args, *extra], '--model', '-m') or recipe.get('model')
    if not model:
        return extra
    if script.in_chans and not (given('in_chans', '--in-chans') or given('input_size', '--input-size')
                                or _is_given(extra, '--input-size')):
        chans = _model_in_chans(model)
        if chans and chans != 3:
            extra += ['--in-chans', str(chans)]
    if not script.in_chans and not given('input_size', '--input-size'):
        extra += _input_size_args(model, _value(args, '--img-size'))
    if name == 'inference' and not given('results_file', '--results-file'):
        extra += _results_file_args(model, [*args, *extra])
    return extra


def _timm_version() -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r'\d+', timm.__version__)[:3])


def fixed_args(name: str, args: Sequence[str]) -> List[str]:
    """``args`` less a flag that cannot work on this install: before timm 1.0.31 onnx_export.py's ``--dynamo``
    calls ``torch.onnx.dynamo_export``, which torch 2.9 removed; there its default ``torch.onnx.export`` is the
    torch.export-based exporter already. From 1.0.31 on ``--dynamo`` asks torch.onnx.export for that exporter and
    the default is the TorchScript one."""
    if (name == 'onnx_export' and '--dynamo' in args and not hasattr(torch.onnx, 'dynamo_export')
            and _timm_version() < (1, 0, 31)):
        print(f'timm_denseres: --dynamo left out: onnx_export.py calls torch.onnx.dynamo_export for it, which torch '
              f'{torch.__version__} does not have; its default, torch.onnx.export, is the torch.export-based (dynamo) '
              f'exporter here', file=sys.stderr)
        return [arg for arg in args if arg != '--dynamo']
    return list(args)


def _model_outputs(args: Sequence[str]) -> Optional[Tuple[int, str]]:
    """The class count the script's model will have, and where it comes from: --num-classes, else the cfg of
    --model (None when unknown)."""
    given = _value(args, '--num-classes')
    if given:
        return (int(given), f'--num-classes {given}') if given.isdigit() else None
    model = _value(args, '--model', '-m')
    try:
        count = start_cfg(model)[1].get('num_classes') if model else None
    except RunError:
        return None
    return (int(count), f"{model}'s num_classes") if count else None


CHECKPOINT_FLAGS = {'train': ('--initial-checkpoint', '--resume'), 'validate': ('--checkpoint',),
                    'inference': ('--checkpoint',), 'onnx_export': ('--checkpoint',)}
"""The flags of each script that name a weights file."""


def check_model(model: str) -> None:
    """Raise :class:`ArgumentError` for a ``--model`` the script would stop on with a traceback: a name timm does
    not know (with the closest ones), a ``local-dir:`` folder without a config.json. ``hf-hub:`` names are left to
    the script, which downloads them."""
    try:
        source, model_id = parse_model_name(model)
    except (AssertionError, ValueError):  # timm's ways of refusing a prefix other than hf-hub: and local-dir:
        raise ArgumentError(f'--model {model}: a model is a name, local-dir:DIR or hf-hub:ORG/NAME') from None
    if source == 'local-dir':
        if not (Path(model_id) / 'config.json').is_file():
            raise ArgumentError(f'--model {model}: {model_id} has no config.json; a checkpoint folder holds '
                                f'config.json and model.safetensors (scripts/export_checkpoint.py writes one)')
        return
    arch = model_id.split('.', 1)[0]
    if source is None and not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.7)
        raise ArgumentError(f'--model {model}: timm knows no model {arch!r}'
                            + (f' (did you mean {", ".join(close)}?)' if close else '')
                            + "; timm.list_models('*dense*') lists this package's")


def check_checkpoint(flag: str, path: str) -> Optional[TrainRun]:
    """Raise :class:`ArgumentError` when ``path`` is not a weights file timm's loaders can read: missing, or a
    corrupt or truncated safetensors / torch file (:func:`timm_denseres.train_run.read_train_run` says why). A torch
    file's weights and run come back, a safetensors file's are left to the script."""
    if not Path(path).is_file():
        raise ArgumentError(f'{flag} {path}: no such file')
    if path.endswith('.safetensors'):
        try:
            with safe_open(path, framework='pt') as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ArgumentError(f'{flag} {path} is not a valid safetensors file ({e}): truncated or corrupt?') from None
        return None
    try:
        return read_train_run(Path(path))
    except RunError as e:
        raise ArgumentError(f'{flag} {e}') from None


def check_args(name: str, args: Sequence[str]) -> None:
    """Raise :class:`ArgumentError` for arguments that would end in a traceback of the script: an unknown
    ``--model`` (:func:`check_model`), a weights file that cannot be read (:func:`check_checkpoint`), a
    ``--checkpoint`` whose classifier has another class count than the model (timm's load raises a size
    mismatch)."""
    model = _value(args, '--model', '-m')
    if model and name != 'onnx_validate':
        check_model(model)
    runs = {flag: check_checkpoint(flag, _value(args, flag)) for flag in CHECKPOINT_FLAGS.get(name, ())
            if _value(args, flag)}
    run, path = runs.get('--checkpoint'), _value(args, '--checkpoint')
    outputs = _model_outputs(args)
    if run is None or outputs is None or not model:
        return
    try:
        classifier = start_cfg(model)[1].get('classifier')
    except RunError:
        return  # hf-hub: not in the cache yet; the script downloads it
    weight = run.state_dict.get(f'{classifier}.weight')
    if weight is not None and weight.dim() > 0 and weight.shape[0] != outputs[0]:
        raise ArgumentError(f'--checkpoint {path} has {weight.shape[0]} classes ({classifier}.weight), the model '
                            f'{outputs[0]} ({outputs[1]}): pass --num-classes {weight.shape[0]}')


def run_script(script: Path, args: Sequence[str]) -> None:
    """Run a script file as `python script args...` would, in this process (models stay registered)."""
    saved_argv = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name='__main__')
    finally:
        sys.argv = saved_argv


@contextmanager
def _swapped(*swaps: Tuple[Any, str, Any]) -> Iterator[None]:
    """Set each ``(owner, attribute, value)`` for the with block; the old values come back after it."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in swaps]
    for owner, attr, value in swaps:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


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

    try:
        with _swapped((timm.models, 'create_model', create_and_follow),
                      (timm.utils, 'update_summary', update_and_write)):
            yield
    finally:
        for telemetry in followed:
            telemetry.detach()


@contextmanager
def model_channels(chans: int) -> Iterator[None]:
    """benchmark.py and onnx_export.py call ``create_model(..., in_chans=3)`` whatever their --input-size says:
    while they run, a model asked for 3 channels gets ``chans``."""
    import timm.models

    create_model = timm.models.create_model

    def create(*args, **kwargs):
        if kwargs.get('in_chans') == 3:
            kwargs['in_chans'] = chans
        return create_model(*args, **kwargs)

    with _swapped((timm, 'create_model', create), (timm.models, 'create_model', create)):
        yield


@contextmanager
def dataset_fixes(chans: int = 3, outputs: Optional[Tuple[int, str]] = None) -> Iterator[None]:
    """``timm.data.create_dataset`` while a script runs: for a 1-channel model (``chans``) images are read in mode
    L where the script does not say (inference.py and onnx_validate.py read RGB); with ``outputs`` (the model's
    class count and its source), data with more classes stops the run with both counts (validate.py raises an
    IndexError in its loss otherwise)."""
    import timm.data

    create_dataset = timm.data.create_dataset

    def create(*args, **kwargs):
        if chans == 1:
            kwargs.setdefault('input_img_mode', 'L')
        dataset = create_dataset(*args, **kwargs)
        reader = getattr(dataset, 'reader', None)
        classes = getattr(reader, 'class_to_idx', None)
        if outputs and classes and len(classes) > outputs[0]:
            root = getattr(reader, 'root', kwargs.get('root'))
            raise ArgumentError(f'the data has {len(classes)} classes ({root}), the model {outputs[0]} '
                                f'({outputs[1]}): pass --num-classes {len(classes)}')
        return dataset

    with _swapped((timm.data, 'create_dataset', create)):
        yield


def write_onnx_cfg(path: str, model: torch.nn.Module, input_size: Optional[Sequence[int]]) -> None:
    """Store the model's data config and labels (:data:`ONNX_CFG_FIELDS` of its pretrained cfg, the exported
    input size) as JSON in the ONNX file's metadata, under :data:`ONNX_CFG_KEY`."""
    import onnx

    cfg = dict(getattr(model, 'pretrained_cfg', None) or {}, num_classes=getattr(model, 'num_classes', None))
    if input_size:
        cfg['input_size'] = tuple(input_size)
    value = json.dumps({key: cfg[key] for key in ONNX_CFG_FIELDS if cfg.get(key) is not None})
    proto = onnx.load(path, load_external_data=False)  # the weights stay in their file beside it
    kept = [prop for prop in proto.metadata_props if prop.key != ONNX_CFG_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=ONNX_CFG_KEY, value=value)
    onnx.save(proto, path)


def read_onnx_cfg(path: Optional[str]) -> Tuple[Dict[str, Any], Optional[int]]:
    """An ONNX file's data config (:data:`ONNX_CFG_KEY`; empty without it) and input channels (None if unknown)."""
    import onnxruntime  # what onnx_validate.py needs anyway

    if not path or not Path(path).is_file():
        return {}, None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        cfg = json.loads(session.get_modelmeta().custom_metadata_map.get(ONNX_CFG_KEY, '{}'))
    except Exception:  # noqa: BLE001  onnxruntime's own error types; onnx_validate.py reports the file itself
        return {}, None
    shape = session.get_inputs()[0].shape
    chans = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else (cfg.get('input_size') or [None])[0]
    return cfg, chans


@contextmanager
def onnx_export_fixes() -> Iterator[None]:
    """``timm.utils.onnx.onnx_export`` while onnx_export.py runs: the input size as a tuple (argparse and config.json
    give lists, which it adds to a tuple), the output's folder made, the exporter's warnings about timm's
    ``dynamic_axes`` and the TorchScript tracer's about this package's channel widths (fixed per model; timm's
    default exporter from 1.0.31 on) silenced, none the user's to act on, and the model's data config written into
    the file (:func:`write_onnx_cfg`)."""
    import timm.utils.onnx

    export = timm.utils.onnx.onnx_export

    def export_with_cfg(model, output_file, *args, input_size=None, **kwargs):
        input_size = input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
        input_size = tuple(input_size) if input_size else None
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)  # torch fails after the export otherwise
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message=".*'dynamic_axes' is not recommended", category=UserWarning)
            warnings.filterwarnings('ignore', message='from_dynamic_axes_to_dynamic_shapes is deprecated',
                                    category=DeprecationWarning)
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning, module=r'timm_denseres\.')
            export(model, output_file, *args, input_size=input_size, **kwargs)
        write_onnx_cfg(output_file, model, input_size)

    with _swapped((timm.utils.onnx, 'onnx_export', export_with_cfg)):
        yield


@contextmanager
def onnx_data_config(cfg: Dict[str, Any], chans: Optional[int]) -> Iterator[None]:
    """``timm.data.resolve_data_config`` while onnx_validate.py runs: it has no model to ask, so its flags alone
    would give ImageNet's 3x224x224 and mean/std. The ONNX file's data config stands for the pretrained cfg and its
    channels for --in-chans; the user's flags still win."""
    import timm.data

    resolve = timm.data.resolve_data_config

    def resolve_with_cfg(args=None, pretrained_cfg=None, model=None, **kwargs):
        args = dict(args or {})
        if chans and args.get('in_chans') is None:
            args['in_chans'] = chans
        return resolve(args, pretrained_cfg or cfg, model, **kwargs)

    with _swapped((timm.data, 'resolve_data_config', resolve_with_cfg)):
        yield


@contextmanager
def script_fixes(name: str, args: Sequence[str]) -> Iterator[None]:
    """What is swapped in timm while its ``name`` script runs with ``args`` (see the module docstring)."""
    with ExitStack() as stack:
        if name == 'train':
            allow_cpu_ddp()
            stack.enter_context(gate_telemetry())
        elif name == 'validate':
            stack.enter_context(dataset_fixes(outputs=_model_outputs(args)))
        elif name == 'inference':
            stack.enter_context(dataset_fixes(chans=_chans(args)))
        elif name in ('benchmark', 'onnx_export'):
            size = _input_size(args)
            if size and size[0] != 3:
                stack.enter_context(model_channels(size[0]))
            if name == 'onnx_export':
                stack.enter_context(onnx_export_fixes())
        elif name == 'onnx_validate':
            cfg, chans = read_onnx_cfg(_value(args, '--onnx-input'))
            stack.enter_context(onnx_data_config(cfg, chans))
            stack.enter_context(dataset_fixes(chans=chans or 3))
        yield


def main(name: str, args: Optional[Sequence[str]] = None) -> None:
    args = sys.argv[1:] if args is None else args
    try:
        repo, rest = pop_timm_repo(args)
        script = resolve_script(name, repo)
        rest = fixed_args(name, rest)
        rest += default_args(name, rest)
        if _is_given(rest, '-h', '--help'):
            print(f"timm's {name}.py from {script}, with the DenseResNet models registered. {REPO_FLAG} DIR (or "
                  f'env {ENV_REPO}) names the pytorch-image-models checkout to take it from; every other flag is '
                  f'its own:\n')
        check_args(name, rest)
        with script_fixes(name, rest):
            run_script(script, rest)
    except (TimmScriptError, PretrainedWeightsError) as e:  # ArgumentError too, raised before or while it runs
        sys.exit(f'error: {e}')
    except ModuleNotFoundError as e:
        if e.name not in EXTRA_MODULES:
            raise
        sys.exit(f"error: timm's {name}.py needs {e.name}, which is not installed: pip install {EXTRA_MODULES[e.name]}")


def train_main() -> None:
    main('train')


def validate_main() -> None:
    main('validate')


def inference_main() -> None:
    main('inference')


def benchmark_main() -> None:
    main('benchmark')


def onnx_export_main() -> None:
    main('onnx_export')


def onnx_validate_main() -> None:
    main('onnx_validate')


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
