"""`python -m timm_denseres`: the main job without its optional parts (matplotlib, a clone around the package).

.ci/clean_install.sh runs the same in a new virtual environment, and as an installed wheel with --model and
--data-dir."""
import shutil
import subprocess
import sys
from pathlib import Path

from timm_denseres.gate_figure import MATPLOTLIB_HINT

REPO_ROOT = Path(__file__).resolve().parent.parent
# matplotlib made unimportable in the child, as in an environment that never installed it
WITHOUT_MATPLOTLIB = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                      "runpy.run_module('timm_denseres', run_name='__main__', alter_sys=True)")


def _main_job(*args: str, cwd: Path, without_matplotlib: bool = False) -> subprocess.CompletedProcess:
    command = ['-c', WITHOUT_MATPLOTLIB] if without_matplotlib else ['-m', 'timm_denseres']
    return subprocess.run([sys.executable, *command, '--no-table', '--show', '2', *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _installed_copy(tmp_path: Path) -> Path:
    """The package alone, as a wheel installs it: no weights/ or data/ beside it."""
    site = tmp_path / 'site'
    shutil.copytree(REPO_ROOT / 'timm_denseres', site / 'timm_denseres',
                    ignore=shutil.ignore_patterns('__pycache__'))
    return site


def test_without_matplotlib_the_figure_is_skipped_with_one_line(tmp_path):
    figure = tmp_path / 'gates.png'
    result = _main_job('--figure', str(figure), cwd=REPO_ROOT, without_matplotlib=True)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first == 'checkpoint: local-dir:weights/denseresnet20_n4.fmnist'  # labelled, relative to the clone
    assert second.startswith('  300 images of data/sample/fashion-mnist/validation: top-1 accuracy ')
    skipped = [line for line in result.stdout.splitlines() if 'gate figure' in line]
    assert skipped == [f'  gate figure skipped: {MATPLOTLIB_HINT}'] and 'pip install matplotlib' in MATPLOTLIB_HINT
    assert not figure.exists()


def test_outside_a_clone_it_says_what_to_pass(tmp_path):
    result = _main_job(cwd=_installed_copy(tmp_path))
    assert result.returncode != 0
    assert result.stdout == ''
    message = result.stderr.strip()
    assert 'no weights/denseresnet20_n4.fmnist/model.safetensors and data/sample/fashion-mnist in ' in message
    assert '--model' in message and '--data-dir' in message
    assert 'Traceback' not in message

