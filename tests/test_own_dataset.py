"""Your own dataset, end to end, by the commands of docs/fine_tune.md and no source edits: fine-tune a checkpoint
folder with timm's train.py, export the run under a new tag, validate the exported folder (and the raw
checkpoint), load it with local-dir:, and publish --dry-run to a repo of your own.

Each step runs as a user runs it, `python scripts/...` in a subprocess. The data is a tiny ImageFolder made here
(3 classes of 1x28x28 PNGs) and the starting checkpoint a denseresnet20_n4 folder with random weights and the
Fashion-MNIST data config, so that the chain takes a few seconds of CPU. timm's train.py and validate.py come
from TIMM_REPO (a pytorch-image-models checkout); without one the test is skipped.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import timm
from PIL import Image

import timm_denseres  # noqa: F401  registers the models
from timm_denseres import pretrained as P
from timm_denseres.export import write_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ('ant', 'bee', 'cat')
START = 'start/denseresnet20_n4.random'  # not a published checkpoint's name: its weights are random
EXPORTED = 'exported/denseresnet20_n4.tiny'

pytestmark = [
    pytest.mark.timm_repo,
    pytest.mark.skipif(not os.environ.get('TIMM_REPO'), reason="needs timm's train.py and validate.py: set "
                       'TIMM_REPO to a pytorch-image-models checkout of the installed version'),
]


def _image_folder(root: Path) -> None:
    """train/ with 4 images a class, validation/ with 2; each class a different brightness."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('validation', 2)):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (28, 28)) + 80 * index
                Image.fromarray(pixels.astype(np.uint8), 'L').save(folder / f'{i}.png')


def _run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(REPO_ROOT / 'scripts' / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _result(stdout: str) -> Dict:
    """The JSON that timm's scripts print after '--result'."""
    return json.loads(stdout.split('--result', 1)[1])


@pytest.fixture(scope='module')
def chain(tmp_path_factory) -> Dict[str, object]:
    root = tmp_path_factory.mktemp('own')
    _image_folder(root / 'data')
    # at gate scale 1, as checkpoints made before the scale became 10: the run keeps it (config.json without a
    # scale means 1)
    start = timm.create_model('denseresnet20_n4', num_classes=10, in_chans=1, gate_logit_scale=1.0)
    start.pretrained_cfg = P.with_data_config(start.pretrained_cfg, P.FASHION_MNIST)
    write_folder(start, root / START, {})  # a checkpoint folder, as exported (weights + config.json)

    steps: Dict[str, List[str]] = {
        'train': ['train.py', '--data-dir', 'data', '--model', f'local-dir:{START}', '--pretrained',
                  '--num-classes', '3', '--epochs', '1', '--batch-size', '4', '--workers', '1',
                  '--output', 'runs', '--experiment', 'tiny'],
        'export': ['export_checkpoint.py', 'runs/tiny/last.pth.tar', '--tag', 'tiny', '--out-dir', 'exported'],
        'validate': ['validate.py', 'data', '--model', f'local-dir:{EXPORTED}', '--pretrained', '--batch-size', '6'],
        'validate_run': ['validate.py', 'data', '--checkpoint', 'runs/tiny/last.pth.tar', '--batch-size', '6'],
        'publish': ['publish.py', EXPORTED, '--repo-id', 'me/denseresnet20_n4.tiny', '--dry-run'],
    }
    out = {name: _ok(_run(root, *command)) for name, command in steps.items()}
    return dict(root=root, out=out)


def test_train_fine_tunes_the_folder(chain) -> None:
    assert _result(chain['out']['train'])[0]['epoch'] == 0
    assert (chain['root'] / 'runs' / 'tiny' / 'last.pth.tar').is_file()


def test_export_resolves_the_folders_architecture_and_takes_the_runs_data(chain) -> None:
    """The run was trained from local-dir:START: its architecture comes from START's config.json; the data config
    from the run (START's, with 3 classes), the label names from the class folders."""
    assert 'wrote exported/denseresnet20_n4.tiny' in chain['out']['export']
    folder = chain['root'] / EXPORTED
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    cfg = model.pretrained_cfg
    assert type(model).__name__ == 'DenseResNet' and cfg['architecture'] == 'denseresnet20_n4'
    assert cfg['tag'] == 'tiny' and model.num_classes == 3 and list(cfg['label_names']) == list(CLASSES)
    assert (tuple(cfg['input_size']), tuple(cfg['mean']), cfg['crop_pct']) == ((1, 28, 28), (0.2860,), 1.0)
    config = json.loads((folder / 'config.json').read_text())
    assert config[P.CONFIG_SHA256_KEY] == P.sha256_file(folder / P.WEIGHTS_FILE)
    assert config['model_args']['gate_logit_scale'] == 1.0 and model.gate_logit_scale == 1.0  # START's


def test_validate_the_exported_folder_as_train_py_did(chain) -> None:
    """validate.py on the folder (no --in-chans, --mean, --device: from its config.json and the launcher) gets the
    accuracy train.py measured on the same images after its epoch; so does validate.py on the raw checkpoint."""
    summary = (chain['root'] / 'runs' / 'tiny' / 'summary.csv').read_text().splitlines()
    header, values = summary[0].split(','), summary[1].split(',')
    trained = float(values[header.index('eval_top1')])
    folder = _result(chain['out']['validate'])
    assert (folder['img_size'], folder['crop_pct'], folder['interpolation']) == (28, 1.0, 'bilinear')
    assert folder['top1'] == pytest.approx(trained, abs=1e-3)
    assert _result(chain['out']['validate_run'])['top1'] == pytest.approx(trained, abs=1e-3)


def test_publish_dry_run_to_a_repo_of_ones_own(chain) -> None:
    out = chain['out']['publish']
    assert 'me/denseresnet20_n4.tiny: README.md' in out and 'dry run: staged in' in out
    staged = chain['root'] / 'build' / 'hub' / 'denseresnet20_n4.tiny'
    assert sorted(p.name for p in staged.iterdir()) == sorted(P.HUB_FILES)
