"""The timm script launcher (timm_denseres/timm_scripts.py), the recipes, and the Fashion-MNIST preparation.

Tests that need timm's real scripts run only when TIMM_REPO points at a pytorch-image-models checkout.
"""
import ast
import contextlib
import csv
import functools
import gzip
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from timm_denseres import timm_scripts
from timm_denseres.timm_scripts import TimmScriptError, resolve_script

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO_ROOT / 'recipes').glob('*.yaml'))
SAMPLE = REPO_ROOT / 'data' / 'sample' / 'fashion-mnist'
DEBIAN_SRC = Path('/usr/share/datasets/fashion-mnist')
UNREACHABLE_URL = 'http://127.0.0.1:9/'  # the discard port: refused at once where nothing listens
VERSION = timm.__version__

needs_timm_repo = pytest.mark.skipif(
    not os.environ.get('TIMM_REPO'),
    reason="needs timm's train.py: set TIMM_REPO to a pytorch-image-models checkout of the installed version")


def _load_prepare_module():
    """scripts/ is not a package: load the preparation script by path."""
    spec = importlib.util.spec_from_file_location('prepare_fashion_mnist',
                                                  REPO_ROOT / 'scripts' / 'prepare_fashion_mnist.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = _load_prepare_module()


@pytest.fixture(autouse=True)
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with more CPUs than any script's default workers, so the launcher adds no --workers (but in the
    tests of that default)."""
    monkeypatch.setattr(timm_scripts, 'available_cpus', lambda: 64)


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No TIMM_REPO, an empty cache under tmp_path, and a download URL that fails at once."""
    monkeypatch.delenv('TIMM_REPO', raising=False)
    monkeypatch.setenv('TIMM_DENSERES_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('TIMM_DENSERES_SCRIPTS_URL', UNREACHABLE_URL)
    return tmp_path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@contextlib.contextmanager
def _serve(directory: Path) -> Iterator[str]:
    """A local HTTP server for `directory`, standing in for raw.githubusercontent.com; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.server_port}'
    finally:
        server.shutdown()
        server.server_close()


def _fake_checkout(root: Path, version: str = VERSION, body: str = 'pass\n') -> Path:
    (root / 'timm').mkdir(parents=True)
    (root / 'timm' / 'version.py').write_text(f"__version__ = '{version}'\n")
    for name in timm_scripts.SCRIPT_NAMES:
        (root / f'{name}.py').write_text(body)
    return root


# --- where the script comes from ---

def test_resolution_order_flag_env_cache(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag_repo = _fake_checkout(isolated_env / 'flag')
    env_repo = _fake_checkout(isolated_env / 'env')
    cached = timm_scripts.cache_dir(VERSION) / 'train.py'
    cached.parent.mkdir(parents=True)
    cached.write_text('pass\n')
    monkeypatch.setenv('TIMM_REPO', str(env_repo))

    assert resolve_script('train', str(flag_repo)) == flag_repo / 'train.py'
    assert resolve_script('train') == env_repo / 'train.py'
    monkeypatch.delenv('TIMM_REPO')
    assert resolve_script('train') == cached  # the unreachable URL is never tried


def test_cache_dir_is_per_version(isolated_env: Path) -> None:
    assert timm_scripts.cache_dir('1.2.3') == isolated_env / 'cache' / 'v1.2.3'


def test_download_fills_cache_once(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = isolated_env / 'served'
    (served / f'v{VERSION}').mkdir(parents=True)
    (served / f'v{VERSION}' / 'validate.py').write_text('RESULT = 42\n')
    with _serve(served) as url:
        monkeypatch.setenv('TIMM_DENSERES_SCRIPTS_URL', url)
        path = resolve_script('validate')
    assert path == timm_scripts.cache_dir(VERSION) / 'validate.py'
    assert path.read_text() == 'RESULT = 42\n'
    assert resolve_script('validate') == path  # server gone: served from the cache


def test_unreachable_network_gives_clear_error(isolated_env: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TimmScriptError) as info:
        resolve_script('train')
    assert time.monotonic() - start < 5
    message = str(info.value)
    for expected in ('TIMM_REPO', '--timm-repo', f'v{VERSION}', UNREACHABLE_URL.rstrip('/')):
        assert expected in message
    assert not (timm_scripts.cache_dir(VERSION) / 'train.py').exists()


def test_html_error_page_is_not_cached(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = isolated_env / 'served' / f'v{VERSION}'
    served.mkdir(parents=True)
    (served / 'train.py').write_text('<html><body>proxy says no</body></html>\n')
    with _serve(served.parent) as url:
        monkeypatch.setenv('TIMM_DENSERES_SCRIPTS_URL', url)
        with pytest.raises(TimmScriptError, match='TIMM_REPO'):
            resolve_script('train')
    assert not (timm_scripts.cache_dir(VERSION) / 'train.py').exists()


def test_main_exits_with_the_message(isolated_env: Path) -> None:
    with pytest.raises(SystemExit) as info:
        timm_scripts.main('train', ['--model', 'resnet10t'])
    assert 'TIMM_REPO' in str(info.value.code)


def test_missing_script_in_checkout(isolated_env: Path) -> None:
    with pytest.raises(TimmScriptError, match='pytorch-image-models checkout'):
        resolve_script('train', str(isolated_env))


def test_version_mismatch_warns(isolated_env: Path) -> None:
    old = _fake_checkout(isolated_env / 'old', version='0.0.1')
    with pytest.warns(UserWarning, match=rf'timm 0\.0\.1.*installed timm is {VERSION}'):
        assert resolve_script('train', str(old)) == old / 'train.py'


def test_matching_version_does_not_warn(isolated_env: Path) -> None:
    same = _fake_checkout(isolated_env / 'same')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        resolve_script('validate', str(same))


# --- how the script is run ---

def test_pop_timm_repo_keeps_other_args_in_order() -> None:
    args = ['--config', 'a.yaml', '--timm-repo', '/x', '--mean', '-0.5', 'data']
    assert timm_scripts.pop_timm_repo(args) == ('/x', ['--config', 'a.yaml', '--mean', '-0.5', 'data'])
    assert timm_scripts.pop_timm_repo(['--timm-repo=/y', '-b', '8']) == ('/y', ['-b', '8'])
    assert timm_scripts.pop_timm_repo(['-b', '8']) == (None, ['-b', '8'])
    with pytest.raises(TimmScriptError):
        timm_scripts.pop_timm_repo(['--timm-repo'])


def test_main_runs_script_as_main_with_args(isolated_env: Path) -> None:
    record = isolated_env / 'record.txt'
    body = ('import sys, timm\n'
            f'open({str(record)!r}, "w").write(repr((__name__, sys.argv, "resnet110" in timm.list_models())))\n')
    repo = _fake_checkout(isolated_env / 'repo', body=body)
    argv_before = list(sys.argv)
    timm_scripts.main('train', ['--model', 'resnet110', '--timm-repo', str(repo), '-b', '8'])
    name, argv, registered = ast.literal_eval(record.read_text())
    assert name == '__main__'
    no_cuda = [] if torch.cuda.is_available() else ['--device', 'cpu']  # the one default resnet110 needs
    assert argv == [str(repo / 'train.py'), '--model', 'resnet110', '-b', '8', *no_cuda]
    assert registered  # our models are visible to the script
    assert sys.argv == argv_before


# --- the defaults the launcher adds ---

NO_CUDA = [] if torch.cuda.is_available() else ['--device', 'cpu']
FMNIST_FOLDER = f'local-dir:{REPO_ROOT / "weights" / "denseresnet110_n4.fmnist"}'


def test_device_cpu_only_without_cuda_and_without_a_choice() -> None:
    assert timm_scripts.default_args('validate', ['data', '--model', 'resnet20']) == NO_CUDA
    assert timm_scripts.default_args('train', ['--model', 'resnet20']) == NO_CUDA
    for given in (['--device', 'cuda:1'], ['--device=cuda']):
        assert timm_scripts.default_args('validate', ['data', '--model', 'resnet20', *given]) == []
    # a recipe's device is the user's choice too
    recipe = ['--config', str(REPO_ROOT / 'recipes' / 'fashion_mnist.yaml')]
    assert timm_scripts.default_args('train', recipe) == []


def test_in_chans_from_the_models_pretrained_cfg() -> None:
    """timm's scripts build a 3-channel model but take the input size (and image mode) from the pretrained cfg:
    a 1-channel checkpoint needs --in-chans 1, unless the user set the channels."""
    for model in (FMNIST_FOLDER, 'denseresnet110_n4.fmnist'):
        for name in ('train', 'validate'):
            assert timm_scripts.default_args(name, ['data', '--model', model]) == [*NO_CUDA, '--in-chans', '1']
    for given in (['--in-chans', '3'], ['--input-size', '3', '28', '28'], ['--in-chans=1']):
        assert timm_scripts.default_args('validate', ['data', '--model', FMNIST_FOLDER, *given]) == NO_CUDA
    assert timm_scripts.default_args('validate', ['data', '--model', 'denseresnet110_n4']) == NO_CUDA
    assert timm_scripts.default_args('validate', ['data', '--model', 'local-dir:/no/such/folder']) == NO_CUDA


def _train_checkpoint(path: Path, **arg_values) -> Path:
    """What timm's train.py saves: its argparse.Namespace beside the weights (random ones here)."""
    import argparse
    model = timm.create_model('denseresnet20_n4', num_classes=3, in_chans=1)
    args = argparse.Namespace(
        model='denseresnet20_n4', pretrained=False, num_classes=3, in_chans=1, input_size=None, img_size=32,
        mean=[0.5], std=[0.25], crop_pct=None, interpolation='bilinear', **arg_values)
    torch.save({'epoch': 0, 'arch': args.model, 'args': args, 'state_dict': model.state_dict()}, path)
    return path


def test_validate_takes_the_data_config_of_a_train_checkpoint(tmp_path: Path) -> None:
    ckpt = str(_train_checkpoint(tmp_path / 'last.pth.tar'))
    extra = timm_scripts.default_args('validate', ['data', '--checkpoint', ckpt])
    crop_pct = timm.models.get_pretrained_cfg('denseresnet20_n4').crop_pct  # train.py's eval took the model's
    assert extra == [*NO_CUDA, '--model', 'denseresnet20_n4', '--num-classes', '3', '--input-size', '1', '32', '32',
                     '--mean', '0.5', '--std', '0.25', '--crop-pct', str(crop_pct), '--interpolation', 'bilinear',
                     '--crop-mode', 'center']
    # what the user gives stays; their channel count goes with the run's image size
    given = ['data', '--checkpoint', ckpt, '--model', 'denseresnet20_n4', '--mean', '0.4', '--in-chans', '3']
    assert timm_scripts.default_args('validate', given) == [
        *NO_CUDA, '--num-classes', '3', '--input-size', '3', '32', '32', '--std', '0.25', '--crop-pct', str(crop_pct),
        '--interpolation', 'bilinear', '--crop-mode', 'center']
    (tmp_path / 'other.pth').write_text('not a checkpoint: validate.py says so itself')
    assert timm_scripts.default_args('validate', ['data', '--checkpoint', str(tmp_path / 'other.pth')]) == NO_CUDA
    assert timm_scripts.default_args('inference', ['data', '--checkpoint', ckpt]) == extra  # the same flags there


FMNIST20 = f'local-dir:{REPO_ROOT / "weights" / "denseresnet20_n4.fmnist"}'


def test_device_only_for_the_scripts_that_take_it() -> None:
    assert timm_scripts.default_args('inference', ['data', '--model', 'resnet20']) == NO_CUDA
    assert timm_scripts.default_args('benchmark', ['--model', 'resnet20']) == NO_CUDA
    assert timm_scripts.default_args('onnx_export', ['out.onnx', '--model', 'resnet20']) == []
    assert timm_scripts.default_args('onnx_validate', ['data', '--onnx-input', 'out.onnx']) == []


def test_workers_default_to_the_cpus_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader warns on every run when the workers (the scripts' defaults: 4 for train.py and validate.py, 2 for
    inference.py and onnx_validate.py) outnumber the CPUs."""
    monkeypatch.setattr(timm_scripts, 'available_cpus', lambda: 2)
    assert timm_scripts.default_args('validate', ['data', '--model', 'resnet20']) == [*NO_CUDA, '--workers', '2']
    assert timm_scripts.default_args('train', ['--model', 'resnet20']) == [*NO_CUDA, '--workers', '2']
    assert timm_scripts.default_args('inference', ['data', '--model', 'resnet20']) == NO_CUDA  # 2 by default
    for given in (['-j', '1'], ['--workers=3']):
        assert timm_scripts.default_args('validate', ['data', '--model', 'resnet20', *given]) == NO_CUDA
    recipe = ['--config', str(REPO_ROOT / 'recipes' / 'fashion_mnist.yaml')]  # it sets workers: 1
    assert timm_scripts.default_args('train', recipe) == []
    monkeypatch.setattr(timm_scripts, 'available_cpus', lambda: 1)
    assert timm_scripts.default_args('onnx_validate', ['data']) == ['--workers', '1']
    assert timm_scripts.default_args('benchmark', ['--model', 'resnet20']) == NO_CUDA  # it has no loader


def test_input_size_for_the_scripts_without_in_chans() -> None:
    """benchmark.py and onnx_export.py take no --in-chans, and add the input size of a config.json (a list) to a
    tuple: a checkpoint's becomes --input-size, which the model's channels then follow (model_channels)."""
    for name, first in (('benchmark', []), ('onnx_export', ['out.onnx'])):
        base = NO_CUDA if name == 'benchmark' else []
        folder = [*first, '--model', FMNIST20]
        assert timm_scripts.default_args(name, folder) == [*base, '--input-size', '1', '28', '28']
        tagged = [*first, '--model', 'denseresnet20_n4.fmnist', '--img-size', '32']
        assert timm_scripts.default_args(name, tagged) == [*base, '--input-size', '1', '32', '32']
        assert timm_scripts.default_args(name, [*folder, '--input-size', '1', '32', '32']) == base
        assert timm_scripts.default_args(name, [*first, '--model', 'denseresnet20_n4']) == base  # a registered cfg


def test_model_channels_follow_the_input_size() -> None:
    with timm_scripts.model_channels(1):
        assert timm.create_model('test_denseresnet', in_chans=3).conv1.in_channels == 1  # as the scripts ask
        assert timm.models.create_model('test_denseresnet', in_chans=2).conv1.in_channels == 2  # another choice stays
    assert timm.create_model('test_denseresnet', in_chans=3).conv1.in_channels == 3


def test_inference_results_file_of_a_folder_or_hub_model() -> None:
    """inference.py names its results file after --model: `local-dir:DIR-28.csv` is a path into a folder that does
    not exist."""
    assert timm_scripts.default_args('inference', ['data', '--model', FMNIST20]) == [
        *NO_CUDA, '--in-chans', '1', '--results-file', 'denseresnet20_n4.fmnist-28']
    extra = timm_scripts.default_args('inference', ['data', '--model', f'{FMNIST20}/', '--img-size', '32'])
    assert extra[-2:] == ['--results-file', 'denseresnet20_n4.fmnist-32']
    for args in (['--model', 'denseresnet20_n4.fmnist'], ['--model', FMNIST20, '--results-file', 'out']):
        assert '--results-file' not in timm_scripts.default_args('inference', ['data', *args])


def test_dynamo_flag_left_out_where_timm_would_call_what_torch_removed(capsys: pytest.CaptureFixture) -> None:
    """Before timm 1.0.31 --dynamo calls torch.onnx.dynamo_export (gone from torch 2.9 on); from 1.0.31 on it asks
    torch.onnx.export for the torch.export-based exporter. CI runs this on the pinned and on the newest timm."""
    args = ['out.onnx', '--model', 'resnet20', '--dynamo']
    timm_version = tuple(int(part) for part in timm.__version__.split('.')[:3])
    if hasattr(torch.onnx, 'dynamo_export') or timm_version >= (1, 0, 31):  # timm's call works
        assert timm_scripts.fixed_args('onnx_export', args) == args
    else:
        assert timm_scripts.fixed_args('onnx_export', args) == args[:-1]
        assert 'torch.onnx.dynamo_export' in capsys.readouterr().err
    assert timm_scripts.fixed_args('validate', ['data', '--dynamo']) == ['data', '--dynamo']  # not ours to judge


def test_checkpoint_of_other_classes_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpt = str(_train_checkpoint(tmp_path / 'last.pth.tar'))  # 3 classes
    bare = tmp_path / 'bare.pth'
    torch.save(torch.load(ckpt, weights_only=False)['state_dict'], bare)
    for name in ('validate', 'inference', 'onnx_export'):
        with pytest.raises(timm_scripts.ArgumentError, match=r'^--checkpoint .*last\.pth\.tar has 3 classes '
                           r'\(fc\.weight\), the model 10 \(--num-classes 10\): pass --num-classes 3$'):
            timm_scripts.check_args(name, ['data', '--checkpoint', ckpt, '--num-classes', '10',
                                           '--model', 'denseresnet20_n4'])
    arch_classes = timm.models.get_pretrained_cfg('denseresnet20_n4').num_classes
    with pytest.raises(timm_scripts.ArgumentError, match=f"the model {arch_classes} \\(denseresnet20_n4's num_classes"):
        timm_scripts.check_args('validate', ['data', '--checkpoint', str(bare), '--model', 'denseresnet20_n4'])
    timm_scripts.check_args('validate', ['data', '--checkpoint', str(bare), '--model', 'denseresnet20_n4',
                                         '--num-classes', '3'])
    args = ['data', '--checkpoint', ckpt]  # a train.py checkpoint brings its class count
    timm_scripts.check_args('validate', [*args, *timm_scripts.default_args('validate', args)])


def test_main_exits_with_the_one_line(isolated_env: Path) -> None:
    ckpt = str(_train_checkpoint(isolated_env / 'last.pth.tar'))
    repo = _fake_checkout(isolated_env / 'repo', body='raise SystemExit("the script ran")\n')
    with pytest.raises(SystemExit) as info:
        timm_scripts.main('validate', ['data', '--checkpoint', ckpt, '--num-classes', '10', '--timm-repo', str(repo)])
    assert str(info.value.code).startswith('error: --checkpoint ') and '\n' not in str(info.value.code)


def test_a_model_timm_does_not_know_is_one_line_with_the_closest_names(tmp_path: Path) -> None:
    for name in ('validate', 'inference', 'benchmark', 'onnx_export', 'train'):
        with pytest.raises(timm_scripts.ArgumentError, match=r"^--model denseresnet20_n3: timm knows no model "
                           r"'denseresnet20_n3' \(did you mean denseresnet20_n4, denseresnet20_n2"):
            timm_scripts.check_args(name, ['data', '--model', 'denseresnet20_n3'])
    with pytest.raises(timm_scripts.ArgumentError, match='has no config.json'):
        timm_scripts.check_args('validate', ['data', '--model', f'local-dir:{tmp_path}'])
    with pytest.raises(timm_scripts.ArgumentError, match='a model is a name, local-dir:DIR or hf-hub:ORG/NAME'):
        timm_scripts.check_args('inference', ['data', '--model', 'hub:someone/model'])
    for model in ('denseresnet20_n4', 'denseresnet20_n4.fmnist', 'resnet50', FMNIST20,
                  'hf-hub:someone/not-cached'):  # a hub name is the script's to download
        timm_scripts.check_args('validate', ['data', '--model', model])


def test_an_unreadable_weights_file_is_one_line(tmp_path: Path) -> None:
    real = _train_checkpoint(tmp_path / 'last.pth.tar')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(real.read_bytes()[:real.stat().st_size // 2])
    corrupt = tmp_path / 'model.safetensors'
    corrupt.write_bytes(b'not a safetensors file')
    cases = [('validate', '--checkpoint', truncated, 'is not a torch checkpoint .*truncated'),
             ('train', '--resume', truncated, 'is not a torch checkpoint'),
             ('train', '--initial-checkpoint', tmp_path / 'missing.pth', 'no such file'),
             ('inference', '--checkpoint', corrupt, 'is not a valid safetensors file .*truncated or corrupt')]
    for name, flag, path, why in cases:
        with pytest.raises(timm_scripts.ArgumentError, match=f'^{flag} {re.escape(str(path))}:? {why}'):
            timm_scripts.check_args(name, ['data', flag, str(path)])
    good = tmp_path / 'good.safetensors'
    safetensors.torch.save_file({'w': torch.zeros(2)}, good)
    timm_scripts.check_args('validate', ['data', '--checkpoint', str(good)])
    timm_scripts.check_args('train', ['data', '--resume', str(real)])


def test_help_names_the_launchers_own_flag(isolated_env: Path, capsys: pytest.CaptureFixture) -> None:
    repo = _fake_checkout(isolated_env / 'repo', body='import argparse\nargparse.ArgumentParser().parse_args()\n')
    with pytest.raises(SystemExit) as info:
        timm_scripts.main('benchmark', ['--help', '--timm-repo', str(repo)])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"timm's benchmark.py from {repo / 'benchmark.py'}") and '--timm-repo DIR' in out
    assert 'usage:' in out


def test_a_module_timm_does_not_install_is_named(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _fake_checkout(isolated_env / 'repo', body='import pandas\n')  # inference.py's first import of its own
    monkeypatch.setitem(sys.modules, 'pandas', None)  # as where pandas is not installed
    with pytest.raises(SystemExit) as info:
        timm_scripts.main('inference', ['data', '--timm-repo', str(repo)])
    assert info.value.code == "error: timm's inference.py needs pandas, which is not installed: pip install pandas"


def test_data_with_more_classes_than_the_model_stops_with_both_counts() -> None:
    with timm_scripts.dataset_fixes(outputs=(5, '--num-classes 5')):
        with pytest.raises(timm_scripts.ArgumentError, match=r'^the data has 10 classes \(.*validation\), the model 5 '
                           r'\(--num-classes 5\): pass --num-classes 10$'):
            timm.data.create_dataset('', root=str(SAMPLE), split='validation')
    with timm_scripts.dataset_fixes(outputs=(10, '--num-classes 10')):
        assert len(timm.data.create_dataset('', root=str(SAMPLE), split='validation')) == 300


def test_one_channel_images_are_read_in_mode_l() -> None:
    """inference.py and onnx_validate.py create their dataset without an image mode: RGB."""
    with timm_scripts.dataset_fixes(chans=1):
        assert timm.data.create_dataset('', root=str(SAMPLE), split='validation')[0][0].mode == 'L'
        dataset = timm.data.create_dataset('', root=str(SAMPLE), split='validation', input_img_mode='RGB')
        assert dataset[0][0].mode == 'RGB'  # the script's own choice stays
    assert timm.data.create_dataset('', root=str(SAMPLE), split='validation')[0][0].mode == 'RGB'


def test_onnx_validate_resolves_the_files_data_config() -> None:
    """onnx_validate.py resolves its data config from its flags alone (ImageNet's, 3 channels): the file's stands in
    for a model's pretrained cfg, and its channels for --in-chans, so a one-value mean stays one value."""
    cfg = {'input_size': [1, 28, 28], 'mean': [0.286], 'std': [0.353], 'crop_pct': 1.0, 'interpolation': 'bilinear'}
    flags = dict(img_size=None, mean=None, std=None, crop_pct=None, interpolation='')  # vars(args) of its defaults
    with timm_scripts.onnx_data_config(cfg, 1):
        data = timm.data.resolve_data_config(flags)
        assert (data['input_size'], data['mean'], data['crop_pct']) == ([1, 28, 28], [0.286], 1.0)
        data = timm.data.resolve_data_config(dict(flags, img_size=32, mean=[0.5], std=[0.25]))
        assert (data['input_size'], data['mean'], data['interpolation']) == ((1, 32, 32), (0.5,), 'bilinear')
    assert timm.data.resolve_data_config(flags)['input_size'] == (3, 224, 224)


# --- recipes (need timm's train.py) ---

def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {'fashion_mnist.yaml', 'cifar100_denseresnet110.yaml', 'imagenet_denseresnet34.yaml',
            'imagenet_densemobilenetv2.yaml'} <= names


@needs_timm_repo
@pytest.mark.timm_repo
@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.stem)
def test_recipe_keys_are_train_args(recipe: Path) -> None:
    train_script = resolve_script('train')
    assert timm_scripts.unknown_recipe_keys(recipe, train_script) == []


@needs_timm_repo
@pytest.mark.timm_repo
def test_recipe_check_catches_typos(tmp_path: Path) -> None:
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: 0.1\nwarmup_epoch: 3\nweight-decay: 1.0e-4\n')
    assert timm_scripts.unknown_recipe_keys(bad, resolve_script('train')) == ['warmup_epoch', 'weight-decay']


def _launch(script: str, *args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """``python scripts/{script}.py args...`` as a user runs it."""
    # the package may not be installed when the tests run from a checkout
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, PYTHONPATH=python_path)
    cmd = [sys.executable, str(REPO_ROOT / 'scripts' / f'{script}.py'), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@needs_timm_repo
@pytest.mark.timm_repo
@pytest.mark.slow
def test_train_one_epoch_on_sample(tmp_path: Path) -> None:
    """A real (tiny) run of timm's train.py through scripts/train.py: 300 images, one epoch (10-25 s on 2 cores)."""
    result = _launch('train', '--config', str(REPO_ROOT / 'recipes' / 'fashion_mnist.yaml'), '--data-dir', str(SAMPLE),
                     '--model', 'resnet10t', '--epochs', '1', '--batch-size', '32',
                     '--output', str(tmp_path), '--experiment', 'smoke')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / 'smoke' / 'summary.csv').read_text().splitlines()
    assert len(summary) == 2  # header + epoch 0


# --- inference.py, benchmark.py, onnx_export.py, onnx_validate.py, and validate.py's errors (need timm's scripts) ---

@needs_timm_repo
@pytest.mark.timm_repo
@pytest.mark.parametrize('script', ['inference', 'benchmark', 'onnx_export', 'onnx_validate'])
def test_launcher_shows_the_scripts_help(script: str) -> None:
    result = _launch(script, '--help')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"timm's {script}.py from ")  # the launcher's line, then the script's help
    assert result.stdout.splitlines()[2].startswith(f'usage: {script}.py')


@needs_timm_repo
@pytest.mark.timm_repo
@pytest.mark.slow
def test_onnx_export_of_a_folder_checkpoint_equals_pytorch(tmp_path: Path) -> None:
    """scripts/onnx_export.py on the bundled 1-channel checkpoint (--dynamo, which torch 2.9 broke, left out):
    onnxruntime's logits on the 300 sample images equal PyTorch's, and scripts/onnx_validate.py takes the data config
    from the file: the README's 93.00 %."""
    import onnxruntime
    from timm_denseres.evaluate import make_loader

    onnx_file = tmp_path / 'denseresnet20_n4.onnx'
    result = _launch('onnx_export', str(onnx_file), '--model', FMNIST20, '--dynamo')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Warning' not in result.stderr
    model = timm.create_model(FMNIST20, pretrained=True, in_chans=1).eval()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[1:] == [1, 28, 28]
    differences = []
    with torch.no_grad():
        for images, _ in make_loader(model, str(SAMPLE), batch_size=100):
            logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
            differences.append(np.abs(logits - model(images).numpy()).max())
    assert len(differences) == 3 and max(differences) < 1e-4

    result = _launch('onnx_validate', str(SAMPLE / 'validation'), '--onnx-input', str(onnx_file))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ' * Prec@1 93.000 ' in result.stdout


@needs_timm_repo
@pytest.mark.timm_repo
def test_inference_with_a_folder_checkpoint(tmp_path: Path) -> None:
    """The checkpoint's channels and label names; the results file in the working folder, named after the folder."""
    result = _launch('inference', str(SAMPLE), '--model', FMNIST20, '--fullname', '--no-console-results', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'denseresnet20_n4.fmnist-28.csv') as f:
        rows = list(csv.DictReader(f))
    names = timm.models.get_pretrained_cfg('denseresnet20_n4.fmnist').label_names
    folders = [prepare.class_folder(label) for label in range(10)]
    correct = sum(names.index(row['label']) == folders.index(Path(row['filename']).parent.name) for row in rows)
    assert (len(rows), correct) == (300, 279)  # 93.00 %, as validate.py


@needs_timm_repo
@pytest.mark.timm_repo
def test_benchmark_of_a_folder_checkpoint() -> None:
    result = _launch('benchmark', '--model', FMNIST20, '--bench', 'inference', '-b', '2', '--num-warm-iter', '1',
                     '--num-bench-iter', '5')
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split('--result\n', 1)[1])
    assert (results['infer_img_size'], results['param_count']) == (28, 0.35)
    assert 'input size (1, 28, 28)' in result.stdout + result.stderr


@needs_timm_repo
@pytest.mark.timm_repo
def test_validate_quiet_and_its_errors_one_line(tmp_path: Path) -> None:
    result = _launch('validate', str(SAMPLE), '--model', FMNIST20)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"top1": 93.0,' in result.stdout and 'Warning' not in result.stderr  # no DataLoader worker warning

    result = _launch('validate', str(SAMPLE), '--model', FMNIST20, '--num-classes', '5')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.splitlines()[-1] == (f'error: the data has 10 classes ({SAMPLE / "validation"}), the model 5 '
                                              f'(--num-classes 5): pass --num-classes 10')
    ckpt = _train_checkpoint(tmp_path / 'last.pth.tar')
    result = _launch('validate', str(SAMPLE), '--checkpoint', str(ckpt), '--num-classes', '10')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == (f'error: --checkpoint {ckpt} has 3 classes (fc.weight), the model 10 '
                                     f'(--num-classes 10): pass --num-classes 3')


# --- Fashion-MNIST preparation and the committed sample ---

def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(prepare.parse_idx(_idx_bytes(images)), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    np.testing.assert_array_equal(prepare.parse_idx(_idx_bytes(labels)), labels)
    with pytest.raises(ValueError, match='magic'):
        prepare.parse_idx(b'\x01\x00\x08\x01' + _idx_bytes(labels)[4:])
    with pytest.raises(ValueError, match='size mismatch'):
        prepare.parse_idx(_idx_bytes(labels)[:-1])


def test_prepare_writes_first_k_per_class(tmp_path: Path) -> None:
    src = tmp_path / 'src'
    src.mkdir()
    labels = np.array([2, 0, 2, 1, 0, 2, 0], dtype=np.uint8)
    images = np.stack([np.full((28, 28), 10 * i, dtype=np.uint8) for i in range(len(labels))])
    for prefix in ('train', 't10k'):
        (src / f'{prefix}-images-idx3-ubyte.gz').write_bytes(gzip.compress(_idx_bytes(images)))
        (src / f'{prefix}-labels-idx1-ubyte.gz').write_bytes(gzip.compress(_idx_bytes(labels)))
    out = tmp_path / 'out'
    prepare.main(['--src', str(src), '--out', str(out), '--train-per-class', '2'])

    def pixel(split: str, label: int, n: int) -> int:
        return int(np.asarray(Image.open(out / split / prepare.class_folder(label) / f'{n:05d}.png'))[0, 0])

    # first two of class 2 are examples 0 and 2; of class 0 examples 1 and 4; class 1 has only example 3
    assert [pixel('train', 2, n) for n in (1, 2)] == [0, 20]
    assert [pixel('train', 0, n) for n in (1, 2)] == [10, 40]
    assert len(list((out / 'train' / prepare.class_folder(0)).iterdir())) == 2
    assert len(list((out / 'validation' / prepare.class_folder(2)).iterdir())) == 3  # no limit given
    with pytest.raises(SystemExit, match='--overwrite'):
        prepare.main(['--src', str(src), '--out', str(out)])


def test_prepare_missing_source_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match='apt-get install dataset-fashion-mnist'):
        prepare.main(['--src', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


def test_prepare_digits_without_scikit_learn_says_how_to_install(tmp_path: Path) -> None:
    script = REPO_ROOT / 'scripts' / 'prepare_digits.py'
    code = ("import runpy, sys; sys.modules['sklearn'] = None; "  # as in an environment without scikit-learn
            f"sys.argv = ['prepare_digits.py', '--out', {str(tmp_path / 'out')!r}]; runpy.run_path({str(script)!r})")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == ('prepare_digits.py needs scikit-learn, which ships the digits: pip install '
                                     'scikit-learn (or pip install -e ".[extras]")')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_sample_layout(split: str) -> None:
    split_dir = SAMPLE / split
    folders = sorted(p.name for p in split_dir.iterdir())
    assert folders == [prepare.class_folder(label) for label in range(10)]
    for folder in folders:
        files = sorted(p.name for p in (split_dir / folder).iterdir())
        assert files == [f'{n:05d}.png' for n in range(1, 31)]
        for name in files[:3] + files[-1:]:
            with Image.open(split_dir / folder / name) as image:
                assert (image.mode, image.size) == ('L', (28, 28))
    # timm's own reader gives each folder the Fashion-MNIST label index
    dataset = timm.data.create_dataset('', root=str(SAMPLE), split=split)
    assert dataset.reader.class_to_idx == {prepare.class_folder(label): label for label in range(10)}
    assert len(dataset) == 300


def test_sample_size_is_small() -> None:
    assert sum(p.stat().st_size for p in SAMPLE.rglob('*.png')) < 1_000_000


@pytest.mark.skipif(not DEBIAN_SRC.is_dir(), reason='needs Debian package dataset-fashion-mnist')
@pytest.mark.parametrize('split,prefix', [('train', 'train'), ('validation', 't10k')])
def test_sample_is_first_30_of_each_class(split: str, prefix: str) -> None:
    images, labels = prepare.load_split(DEBIAN_SRC, prefix)
    assert images.shape[1:] == (28, 28) and len(images) == len(labels)
    for label in range(10):
        expected = images[np.flatnonzero(labels == label)[:30]]
        written = [np.asarray(Image.open(SAMPLE / split / prepare.class_folder(label) / f'{n:05d}.png'))
                   for n in range(1, 31)]
        np.testing.assert_array_equal(np.stack(written), expected)
