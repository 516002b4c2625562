"""Pretrained weights: the PUBLISHED table and its tagged cfgs, export and publish, loading three ways offline, warm
starts, checksums (the table's and the one each folder's config.json carries), and a clear message for every way
loading can fail.

Nothing here reaches the network or mocks huggingface_hub. ``local-dir:`` loads read a folder. Tag and ``hf-hub:``
loads read a Hugging Face cache that the test fills in huggingface_hub's own layout (refs/main -> snapshot ->
blobs), from a subprocess started with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set: huggingface_hub reads both when it
is imported, so they cannot be changed for an already running interpreter. One subprocess does all cached loads
(``offline_run``); the tests read its results.

Weights are random (BatchNorm statistics randomized so that no block is trivially zero), never trained; they only
live in tmp dirs. The checksum of such a file is put into ``PUBLISHED`` by the test itself.
"""
import argparse
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from timm.models import get_pretrained_cfg, save_for_hf

import timm_denseres  # noqa: F401  registers the models
from helpers import randomise, reference_adjust
from timm_denseres import export as E
from timm_denseres import hub as H
from timm_denseres import pretrained as P
from timm_denseres.train_run import RunError

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / 'data' / 'sample' / 'fashion-mnist'

FM = 'denseresnet110_n4.fmnist'
FM_REPO = f'{P.HUB_ORG}/{FM}'
NEW = 'denseresnet20_n2.fmnist'  # not published: the offline subprocess adds its PUBLISHED line
WARM = 'denseresnet34_n6.a1_in1k_warm'
MNV2_WARM = 'densemobilenetv2_n4.ra_in1k_warm'
HAS_MNV2_WARM = MNV2_WARM in timm.list_pretrained('densemobilenetv2*')
TOL = 1e-4  # the bound on warm-start logits


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _random_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(timm.create_model(name, **kwargs), seed + 1).eval()


def _input(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _save_train_checkpoint(path: Path, model: nn.Module, ema: nn.Module, arch: str) -> None:
    """What timm's train.py (CheckpointSaver._save) writes: DDP-prefixed state_dict, EMA, args, optimizer."""
    args = argparse.Namespace(
        model=arch, num_classes=10, in_chans=1, input_size=[1, 28, 28], img_size=None, mean=[0.2860], std=[0.3530],
        crop_pct=1.0, interpolation='bilinear', epochs=4, batch_size=64, opt='sgd', lr=0.05, model_ema=True)
    torch.save({
        'epoch': 3, 'arch': arch, 'version': 2, 'metric': 90.0, 'args': args,
        'optimizer': torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
        'state_dict_ema': ema.state_dict(),
    }, path)


def fill_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` into a Hugging Face cache as the ``main`` revision of ``repo_id``, in huggingface_hub's
    layout: ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main = <commit>}``."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex id names the snapshot
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    (repo / 'blobs').mkdir()
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    for f in sorted(folder.iterdir()):
        blob = repo / 'blobs' / P.sha256_file(f)
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def _copy_folder(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _error(fn) -> str:
    with pytest.raises(P.PretrainedWeightsError) as info:
        fn()
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# the published-checkpoint fixture: random weights -> train.py checkpoint -> export -> publish --dry-run


@pytest.fixture(scope='module')
def published(tmp_path_factory) -> Dict[str, Any]:
    """Random weights published as FM into tmp dirs. Their checksum is recorded for FM while this module runs
    (it replaces the real one, if any), so that every load of them is checked."""
    tmp = tmp_path_factory.mktemp('published')
    model = _random_model('denseresnet110_n4', seed=0, num_classes=10, in_chans=1)  # the architecture the run names
    ema = _random_model('denseresnet110_n4', seed=10, num_classes=10, in_chans=1)  # the EMA weights: published
    _save_train_checkpoint(tmp / 'model_best.pth.tar', model, ema, 'denseresnet110_n4')
    folder = E.export(tmp / 'model_best.pth.tar', 'fmnist', out_dir=tmp / 'weights', top1=91.25,
                      train_command='python scripts/train.py --config recipes/fashion_mnist.yaml')
    sha256 = P.sha256_file(folder / P.WEIGHTS_FILE)
    with pytest.MonkeyPatch.context() as mp:
        config = json.loads((folder / 'config.json').read_text())
        scale = config['model_args']['gate_logit_scale']  # the export records the weights' gate scale
        mp.setitem(P.PUBLISHED, FM, P.Published('fmnist', sha256, scale))
        staged = H.publish(folder, dry_run=True, staging_dir=tmp / 'stage')
        x = _input((2, 1, 28, 28))
        yield dict(tmp=tmp, folder=folder, staged=staged, x=x, ema_logits=_logits(ema, x),
                   model_logits=_logits(model, x), sha256=sha256, gate_logit_scale=scale)


@pytest.fixture
def record(monkeypatch):
    """Record a checkpoint's sha256 in PUBLISHED (None: not published) for the duration of a test."""
    def _record(name, sha):
        if sha is None:
            monkeypatch.delitem(P.PUBLISHED, name, raising=False)
        else:
            monkeypatch.setitem(P.PUBLISHED, name, P.Published('fmnist', sha))
    return _record


# ---------------------------------------------------------------------------------------------------------------
# the subprocess that loads from a pre-filled HF cache with HF_HUB_OFFLINE=1

OFFLINE_SCRIPT = r'''
import importlib.util, json, sys

cfg = json.loads(open(sys.argv[1]).read())
# A new checkpoint is one line in PUBLISHED: the line is added here before the models register, as an edit of
# pretrained.py would add it (the family files take their tagged cfgs from the table when they are imported).
spec = importlib.util.spec_from_file_location('timm_denseres.pretrained', cfg['pretrained_py'])
P = importlib.util.module_from_spec(spec)
sys.modules['timm_denseres.pretrained'] = P
spec.loader.exec_module(P)
P.PUBLISHED[cfg['new']] = P.Published('fmnist', cfg['new_sha256'], cfg['gate_logit_scale'])
import timm, torch
import timm_denseres

inputs = torch.load(cfg['inputs'])
results, tensors = {}, {}

def logits(key, name, x, **kwargs):
    try:
        model = timm.create_model(name, pretrained=True, **kwargs).eval()
        with torch.no_grad():
            tensors[key] = model(x)
        gates = [round(m.fc2.bias.view(-1, m.channels)[0, 0].item() * m.logit_scale, 4)  # v's logit
                 for n, m in model.named_modules() if n.endswith('.gate')]
        results[key] = {'ok': True, 'v_logits': sorted(set(gates))}
    except Exception as e:
        results[key] = {'error': f'{type(e).__name__}: {e}'}

def error(key, fn):
    try:
        fn()
        results[key] = {'ok': True}
    except Exception as e:
        results[key] = {'error': f'{type(e).__name__}: {e}'}

routes = {'tag': cfg['name'], 'hf_hub': 'hf-hub:' + cfg['repo_id'], 'local_dir': 'local-dir:' + cfg['staged']}
P.PUBLISHED[cfg['name']] = P.Published('fmnist', cfg['sha256'], cfg['gate_logit_scale'])  # the line export prints
for route, name in routes.items():
    logits(route, name, inputs['fm'])
P.PUBLISHED[cfg['name']] = P.Published('fmnist', '0' * 64, cfg['gate_logit_scale'])
for route, name in routes.items():
    logits('bad_sum_' + route, name, inputs['fm'])
P.PUBLISHED[cfg['name']] = P.Published('fmnist', cfg['sha256'], cfg['gate_logit_scale'])
logits('new', cfg['new'], inputs['fm'])
new_cfg = timm.models.get_pretrained_cfg(cfg['new']).to_dict()
results['new_cfg'] = {k: new_cfg[k] for k in ('hf_hub_id', 'input_size', 'pool_size', 'mean', 'label_names')}
logits('warm', cfg['warm'], inputs['in'])
logits('warm_gate6', cfg['warm'], inputs['in'], gate_logit=6.0)
logits('warm_file', cfg['warm'], inputs['in'], pretrained_cfg_overlay=dict(file=cfg['warm_file']))  # the offline way
error('not_cached_warm', lambda: timm.create_model(cfg['warm'], pretrained=True, cache_dir=cfg['empty_cache']))
if cfg['mnv2_warm']:
    logits('warm_mnv2', cfg['mnv2_warm'], inputs['in'])
error('not_cached_tag', lambda: timm.create_model('resnet110.fmnist', pretrained=True))
error('not_cached_hf_hub', lambda: P.create_model('hf-hub:timm-denseres/resnet110.fmnist', pretrained=True))
torch.save(tensors, cfg['out'])
print(json.dumps(results))
'''


def _run(script: str, args, env_extra: Dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    path = [str(REPO_ROOT)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS='1', **env_extra)
    for key in ('HF_HUB_OFFLINE', 'HF_ENDPOINT', 'HF_HUB_CACHE', 'HF_HOME'):
        if key not in env_extra:
            env.pop(key, None)
    return subprocess.run([sys.executable, '-c', script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope='module')
def offline_run(published, tmp_path_factory) -> Dict[str, Any]:
    tmp = tmp_path_factory.mktemp('offline')
    cache = tmp / 'hf-cache'
    fill_hf_cache(cache, FM_REPO, published['staged'])
    # timm's own resnet34 / mobilenetv2_100, randomly initialised, in Hub layout under the ids the warm tags use
    resnet34 = _random_model('resnet34', seed=2, zero_init_last=False)
    save_for_hf(resnet34, tmp / 'resnet34', safe_serialization=True)
    fill_hf_cache(cache, get_pretrained_cfg(WARM).hf_hub_id, tmp / 'resnet34')
    x_in = _input((2, 3, 64, 64), seed=3)
    base_logits = {'warm': _logits(resnet34, x_in)}
    if HAS_MNV2_WARM:
        mnv2 = _random_model('mobilenetv2_100', seed=4)
        save_for_hf(mnv2, tmp / 'mnv2', safe_serialization=True)
        fill_hf_cache(cache, get_pretrained_cfg(MNV2_WARM).hf_hub_id, tmp / 'mnv2')
        base_logits['warm_mnv2'] = _logits(mnv2, x_in)
    # a checkpoint that is not in PUBLISHED yet: the subprocess adds its line
    new = _random_model('denseresnet20_n2', seed=8, num_classes=10, in_chans=1)
    save_for_hf(new, tmp / 'new', safe_serialization=True,  # as the export writes it: with the gates' scale
                model_args={'gate_logit_scale': new.gate_logit_scale})
    fill_hf_cache(cache, P.hub_repo_id(NEW), tmp / 'new')
    base_logits['new'] = _logits(new, published['x'])
    torch.save({'fm': published['x'], 'in': x_in}, tmp / 'inputs.pt')
    cfg = dict(name=FM, repo_id=FM_REPO, staged=str(published['staged']), sha256=published['sha256'], warm=WARM,
               gate_logit_scale=published['gate_logit_scale'],
               new=NEW, new_sha256=P.sha256_file(tmp / 'new' / P.WEIGHTS_FILE),
               pretrained_py=str(REPO_ROOT / 'timm_denseres' / 'pretrained.py'),
               mnv2_warm=MNV2_WARM if HAS_MNV2_WARM else None, inputs=str(tmp / 'inputs.pt'), out=str(tmp / 'out.pt'),
               warm_file=str(tmp / 'resnet34' / P.WEIGHTS_FILE), empty_cache=str(tmp / 'empty-cache'))
    (tmp / 'cfg.json').write_text(json.dumps(cfg))
    proc = _run(OFFLINE_SCRIPT, [tmp / 'cfg.json'], {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(results=results, logits=torch.load(tmp / 'out.pt'), base_logits=base_logits, cache=cache)


# ---------------------------------------------------------------------------------------------------------------
# cfgs


def test_tagged_cfgs_point_at_the_hub():
    listed = timm.list_pretrained('dense*') + timm.list_pretrained('resnet110*')
    for name in ('resnet110.fmnist', FM):
        assert name in listed
        cfg = get_pretrained_cfg(name)
        assert cfg.hf_hub_id == f'timm-denseres/{name}'
        assert cfg.num_classes == 10 and cfg.input_size == (1, 28, 28) and cfg.mean == (0.2860,)
        assert cfg.std == (0.3530,) and cfg.crop_pct == 1.0 and cfg.interpolation == 'bilinear'
        assert cfg.pool_size == (7, 7) and cfg.label_names[0] == 'T-shirt/top' and cfg.first_conv == 'conv1'
        assert cfg.description == "Trained on Fashion-MNIST (10 classes, 28x28 grayscale) with timm's train.py."
    assert WARM in listed
    assert set(P.WARM_STARTS) >= {WARM}


@pytest.mark.parametrize('name', sorted(P.PUBLISHED))
def test_published_line_makes_the_tagged_cfg(name):
    """Every tagged cfg of the project is its PUBLISHED line applied to the model's untagged cfg."""
    arch, tag = name.split('.')
    registered = get_pretrained_cfg(name).to_dict()
    assert registered == dict(P.published_cfg(name, get_pretrained_cfg(arch).to_dict()), tag=tag)
    assert P.PUBLISHED[name].dataset in P.DATASETS


def test_a_new_checkpoint_is_one_line_in_published(offline_run, published):
    """denseresnet20_n2.fmnist is not published; with its line added it has a tagged cfg (the Fashion-MNIST data
    config on the CIFAR layout, a 7x7 final map) and loads by its tag from the Hub cache, checksum checked."""
    assert NEW not in timm.list_pretrained('denseresnet20*')
    result = offline_run['results']['new']
    assert result.get('ok'), result
    assert torch.equal(offline_run['logits']['new'], offline_run['base_logits']['new'])
    assert offline_run['results']['new_cfg'] == dict(
        hf_hub_id=P.hub_repo_id(NEW), input_size=[1, 28, 28], pool_size=[7, 7], mean=[0.2860],
        label_names=list(P.FASHION_MNIST['label_names']))


def test_untagged_default_is_unchanged():
    """Publishing fmnist must not turn plain denseresnet110_n4 into a Fashion-MNIST model."""
    model = timm.create_model('denseresnet110_n4')
    assert model.num_classes == 100 and model.conv1.in_channels == 3
    assert model.pretrained_cfg.get('tag') is None
    assert timm.create_model('denseresnet34_n6').pretrained_cfg.get('hf_hub_id') is None


def test_warm_cfg_takes_the_source_data_config():
    warm, src = get_pretrained_cfg(WARM), get_pretrained_cfg(P.WARM_STARTS[WARM])
    assert warm.hf_hub_id == src.hf_hub_id == 'timm/resnet34.a1_in1k'
    assert not warm.url  # from the Hub, by id
    for key in ('input_size', 'test_input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes'):
        assert getattr(warm, key) == getattr(src, key), key


# ---------------------------------------------------------------------------------------------------------------
# export and publish


def test_export_writes_the_hub_folder_with_the_ema_weights(published):
    folder = published['folder']
    assert folder.name == FM
    assert sorted(p.name for p in folder.iterdir()) == sorted(P.HUB_FILES)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'denseresnet110_n4' and config['num_classes'] == 10
    assert config['pretrained_cfg']['tag'] == 'fmnist' and config['pretrained_cfg']['input_size'] == [1, 28, 28]
    assert config['pretrained_cfg']['label_names'] == list(P.FASHION_MNIST['label_names'])
    assert config[P.CONFIG_SHA256_KEY] == P.sha256_file(folder / P.WEIGHTS_FILE)
    card = ModelCard.load(folder / 'README.md')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert card.data.datasets == ['zalando-datasets/fashion_mnist'] and card.data.metrics == ['accuracy']
    assert card.data.eval_results[0].metric_value == 91.25
    assert 'Dense Residual Networks for Image Classification' in card.text
    assert P.sha256_file(folder / P.WEIGHTS_FILE) in card.text
    assert f"timm.create_model('{FM}', pretrained=True)" in card.text
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    logits = _logits(model, published['x'])
    assert torch.equal(logits, published['ema_logits'])
    assert not torch.allclose(logits, published['model_logits'])


def test_export_model_weights_and_refusals(published, tmp_path, record):
    ckpt = published['tmp'] / 'model_best.pth.tar'
    record(FM, None)  # other weights under the same name
    folder = E.export(ckpt, 'fmnist', weights='model', out_dir=tmp_path)
    assert torch.equal(_logits(timm.create_model(f'local-dir:{folder}', pretrained=True), published['x']),
                       published['model_logits'])
    with pytest.raises(E.ExportError, match='exists and is not empty'):
        E.export(ckpt, 'fmnist', out_dir=tmp_path)
    with pytest.raises(E.ExportError, match=r"claims tag 'cifar100' \(CIFAR-100\).*num_classes: the run has 10, "):
        E.export(ckpt, 'cifar100', out_dir=tmp_path)
    with pytest.raises(E.ExportError, match='is not a checkpoint of the project'):
        E.export(ckpt, 'a1_in1k_warm', model_name='denseresnet34_n6', out_dir=tmp_path)
    with pytest.raises(E.ExportError, match='use letters, digits and underscores'):
        E.export(ckpt, 'my.tag', out_dir=tmp_path)
    # trained with another normalisation than the tag says: refused, naming the field
    ck = torch.load(ckpt, weights_only=False)
    ck['args'].mean = [0.5]
    torch.save(ck, tmp_path / 'other.pth.tar')
    with pytest.raises(E.ExportError, match=rf'mean: the run has \(0.5,\), the published {FM} has \(0.286,\)'):
        E.export(tmp_path / 'other.pth.tar', 'fmnist', out_dir=tmp_path / 'x')


def test_fmnist_class_folders_name_the_fmnist_classes(published, tmp_path, record):
    """A run on the Fashion-MNIST ImageFolder ('0_t-shirt_top', ...) may claim the fmnist tag: its class folders
    name the registered classes (case, punctuation and the leading index aside)."""
    ck = torch.load(published['tmp'] / 'model_best.pth.tar', weights_only=False)
    ck['args'].data_dir, ck['args'].dataset, ck['args'].train_split = str(SAMPLE), '', 'train'
    torch.save(ck, tmp_path / 'fmnist.pth.tar')
    record(FM, None)
    folder = E.export(tmp_path / 'fmnist.pth.tar', 'fmnist', out_dir=tmp_path)
    assert json.loads((folder / 'config.json').read_text())['pretrained_cfg']['label_names'][-1] == 'Ankle boot'


def _image_folder(root: Path, classes, per_class: int = 1, size: int = 28) -> Path:
    gen = torch.Generator().manual_seed(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, 'L').save(root / name / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory) -> Dict[str, Any]:
    """A 'digits' run (class folders 0..9, the Fashion-MNIST data config) fine-tuned with train.py from a
    local-dir: folder of denseresnet20_n4: what timm's train.py writes, with random weights."""
    tmp = tmp_path_factory.mktemp('digits')
    start = _random_model('denseresnet20_n4', seed=20, num_classes=10, in_chans=1)
    start.pretrained_cfg = P.with_data_config(start.pretrained_cfg, P.FASHION_MNIST)
    save_for_hf(start, tmp / 'start' / 'denseresnet20_n4.fmnist', safe_serialization=True,
                model_args={'gate_logit_scale': start.gate_logit_scale})  # as an export records it
    data = _image_folder(tmp / 'data' / 'train', [str(d) for d in range(10)]).parent
    arch = f"local-dir:{tmp / 'start' / 'denseresnet20_n4.fmnist'}"
    tuned = _random_model('denseresnet20_n4', seed=21, num_classes=10, in_chans=1)
    args = argparse.Namespace(
        model=arch, pretrained=True, num_classes=10, in_chans=1, input_size=None, img_size=None, mean=None,
        std=None, crop_pct=None, interpolation='', data_dir=str(data), dataset='', train_split='train', class_map='',
        model_kwargs={}, epochs=1, batch_size=4)
    torch.save({'epoch': 0, 'arch': arch, 'args': args, 'state_dict': tuned.state_dict()}, tmp / 'last.pth.tar')
    return dict(tmp=tmp, ckpt=tmp / 'last.pth.tar', arch=arch, logits=_logits(tuned, _input((2, 1, 28, 28))))


def test_a_run_on_other_data_cannot_take_the_fmnist_tag(digits_run, tmp_path):
    """Same classes count and data config as Fashion-MNIST, other classes: the fmnist card would be a lie."""
    with pytest.raises(E.ExportError) as info:
        E.export(digits_run['ckpt'], 'fmnist', out_dir=tmp_path)
    message = str(info.value)
    assert '--tag fmnist claims the published denseresnet20_n4.fmnist, but the run was trained on something else' in message
    assert 'label names: the run has 0, 1, 2, 3' in message and 'T-shirt/top' in message
    assert 'mean' not in message and 'num_classes' not in message  # only the classes differ
    assert not (tmp_path / 'denseresnet20_n4.fmnist').exists()


def test_own_tag_takes_the_runs_data_config_and_classes(digits_run, tmp_path):
    folder = E.export(digits_run['ckpt'], 'digits', out_dir=tmp_path, dataset_id='me/digits')
    assert folder.name == 'denseresnet20_n4.digits'  # the architecture from the local-dir: folder's config.json
    config = json.loads((folder / 'config.json').read_text())
    cfg = config['pretrained_cfg']
    assert config['architecture'] == 'denseresnet20_n4' and config['num_classes'] == 10
    assert cfg['label_names'] == [str(d) for d in range(10)]
    assert (cfg['input_size'], cfg['mean'], cfg['std'], cfg['crop_pct'], cfg['pool_size']) == (
        [1, 28, 28], [0.286], [0.353], 1.0, [7, 7])
    assert cfg['description'].startswith('Fine-tuned on digits (10 classes, 1x28x28)')
    assert digits_run['arch'] in cfg['description']
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert list(model.pretrained_cfg['label_names']) == [str(d) for d in range(10)]
    assert torch.equal(_logits(model, _input((2, 1, 28, 28))), digits_run['logits'])
    card = ModelCard.load(folder / 'README.md')
    assert card.data.datasets == ['me/digits'] and "'local-dir:denseresnet20_n4.digits'" in card.text
    # a repo of one's own needs no line in PUBLISHED; the project's does, to upload
    staged = H.publish(folder, repo_id='me/denseresnet20_n4.digits', dry_run=True, staging_dir=tmp_path / 'stage')
    assert sorted(p.name for p in staged.iterdir()) == sorted(P.HUB_FILES)
    with pytest.raises(H.PublishError, match='denseresnet20_n4.digits has no line in PUBLISHED'):
        H.publish(folder, dry_run=False, staging_dir=tmp_path / 'stage2')
    with pytest.raises(H.PublishError, match="repo id 'digits': expected ORG/NAME"):
        H.publish(folder, repo_id='digits', dry_run=True, staging_dir=tmp_path / 'stage3')


def test_export_label_names_and_train_args(digits_run, tmp_path):
    ckpt = digits_run['ckpt']
    with pytest.raises(E.ExportError, match=r'3 label names \(--label-names\) for 10 classes'):
        E.export(ckpt, 'digits', out_dir=tmp_path, label_names=['a', 'b', 'c'])
    names = [f'digit {d}' for d in range(10)]
    folder = E.export(ckpt, 'digits', out_dir=tmp_path, label_names=names, dataset_name='Digits')
    assert json.loads((folder / 'config.json').read_text())['pretrained_cfg']['label_names'] == names
    # a bare state dict says nothing about its data: train.py's args.yaml does
    ck = torch.load(ckpt, weights_only=False)
    torch.save(ck['state_dict'], tmp_path / 'bare.pth')
    with pytest.raises(RunError, match='--train-args'):
        E.export(tmp_path / 'bare.pth', 'digits2', model_name=digits_run['arch'], out_dir=tmp_path)
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(vars(ck['args'])))
    folder = E.export(tmp_path / 'bare.pth', 'digits2', train_args=tmp_path / 'args.yaml', out_dir=tmp_path)
    assert json.loads((folder / 'config.json').read_text())['pretrained_cfg']['input_size'] == [1, 28, 28]


class _Anything:
    """Stands for any class a pickle might name."""


def test_a_pickle_is_refused_in_one_line(tmp_path, capsys):
    torch.save({'state_dict': {}, 'extra': _Anything()}, tmp_path / 'evil.pth.tar')
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(RunError, match=r'holds Python objects besides tensors .*\(test_pretrained._Anything\)'):
        E.export(tmp_path / 'evil.pth.tar', 'x', out_dir=tmp_path)
    for main, argv in ((E.main, [str(tmp_path / 'evil.pth.tar'), '--tag', 'x', '--out-dir', str(tmp_path)]),
                       (H.main, ['--checkpoint', str(tmp_path / 'evil.pth.tar'), '--tag', 'x', '--dry-run',
                                 '--staging-dir', str(tmp_path)]),
                       (E.main, [str(tmp_path / 'text.pth'), '--tag', 'x', '--out-dir', str(tmp_path)])):
        with pytest.raises(SystemExit) as info:
            main(argv)
        message = str(info.value.code)
        assert message.startswith('error: ') and '\n' not in message and 'weights_only=False' not in message
    assert 'is not a torch checkpoint (torch.save writes a zip archive)' in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ['evil.pth.tar', 'text.pth']  # nothing written


def test_publish_dry_run_stages_exactly_the_folder(published, tmp_path):
    staged = published['staged']
    assert staged.name == FM
    for name in P.HUB_FILES:
        assert (staged / name).read_bytes() == (published['folder'] / name).read_bytes()
    assert sorted(p.name for p in staged.iterdir()) == sorted(P.HUB_FILES)
    # a stray file is not uploaded: refused
    bad = _copy_folder(published['folder'], tmp_path / FM)
    (bad / 'notes.txt').write_text('x')
    with pytest.raises(H.PublishError, match='notes.txt'):
        H.publish(bad, dry_run=True, staging_dir=tmp_path / 'stage')


def test_publish_refuses_a_wrong_name_or_checksum(published, tmp_path, record):
    with pytest.raises(H.PublishError, match='repo name must be'):
        H.publish(published['folder'], repo_id='timm-denseres/resnet110.fmnist', dry_run=True, staging_dir=tmp_path)
    record(FM, 'f' * 64)
    with pytest.raises(H.PublishError, match=f'but PUBLISHED records {"f" * 64} for {FM}'):
        H.publish(published['folder'], dry_run=True, staging_dir=tmp_path)


def test_publish_refuses_weights_that_are_not_the_exported_ones(published, tmp_path, record):
    record(FM, None)
    changed = _copy_folder(published['folder'], tmp_path / 'changed' / FM)
    data = bytearray((changed / P.WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x01
    (changed / P.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(H.PublishError, match='the weights were changed after the export'):
        H.publish(changed, dry_run=True, staging_dir=tmp_path / 'stage')
    old = _copy_folder(published['folder'], tmp_path / 'old' / FM)  # an export from before the field existed
    config = json.loads((old / 'config.json').read_text())
    del config[P.CONFIG_SHA256_KEY]
    (old / 'config.json').write_text(json.dumps(config))
    with pytest.raises(H.PublishError, match=f'config.json has no {P.CONFIG_SHA256_KEY}: export the checkpoint'):
        H.publish(old, dry_run=True, staging_dir=tmp_path / 'stage')


def test_publish_needs_a_recorded_checksum_to_upload(published, tmp_path, record):
    record(FM, None)
    with pytest.raises(H.PublishError, match=f'{FM} has no line in PUBLISHED'):
        H.publish(published['folder'], dry_run=False, staging_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# acceptance: one set of weights, three routes, identical logits


@pytest.mark.parametrize('route', ['tag', 'hf_hub', 'local_dir'])
def test_offline_round_trip_gives_identical_logits(offline_run, published, route):
    result = offline_run['results'][route]
    assert result.get('ok'), result
    assert torch.equal(offline_run['logits'][route], published['ema_logits'])


@pytest.mark.parametrize('route', ['tag', 'hf_hub', 'local_dir'])
def test_checksum_is_checked_on_every_route(offline_run, published, route):
    message = offline_run['results'][f'bad_sum_{route}']['error']
    assert f'Checksum mismatch for {FM}' in message
    assert published['sha256'] in message and '0' * 64 in message


BUNDLED_WAY_OUT = ("load the copy in this checkout, no Hub needed: "
                   "timm.create_model('local-dir:weights/resnet110.fmnist'")


def test_hub_unreachable_offline_says_what_to_do(offline_run):
    for key in ('not_cached_tag', 'not_cached_hf_hub'):
        message = offline_run['results'][key]['error']
        assert message.startswith('PretrainedWeightsError'), message
        assert 'offline mode is on (HF_HUB_OFFLINE=1)' in message
        assert 'timm-denseres/resnet110.fmnist is not in the Hugging Face cache' in message
        assert str(offline_run['cache']) in message
        for way_out in (BUNDLED_WAY_OUT, 'HF_HUB_OFFLINE unset', 'HF_ENDPOINT', "'local-dir:DIR'"):
            assert way_out in message, (key, way_out)


def test_a_warm_start_offline_says_how_to_load_its_file(offline_run):
    """A warm start's weights are timm's checkpoint of another model: the way out loads that file into the warm
    model (local-dir: would build the other model), and that way works."""
    message = offline_run['results']['not_cached_warm']['error']
    assert f"hf download {get_pretrained_cfg(WARM).hf_hub_id} {P.WEIGHTS_FILE} --local-dir DIR" in message, message
    assert (f"timm.create_model('{WARM}', pretrained=True, pretrained_cfg_overlay=dict(file='DIR/{P.WEIGHTS_FILE}'))"
            in message), message
    assert "'local-dir:DIR'" not in message
    assert offline_run['results']['warm_file'].get('ok'), offline_run['results']['warm_file']
    assert torch.equal(offline_run['logits']['warm_file'], offline_run['logits']['warm'])


def test_hub_unreachable_online_says_what_to_do(tmp_path):
    """Not offline, but the endpoint refuses connections: the Hub is asked once, without huggingface_hub's
    retries (which log 'Retrying in Ns' and take ~23 s a file), for the tag and for an hf-hub: name; the error
    comes alone, not chained to the HTTP client's."""
    script = ("import logging, timm, timm_denseres\n"
              "from timm_denseres.pretrained import create_model\n"
              "logging.basicConfig()\n"
              "for create, name in ((timm.create_model, 'resnet110.fmnist'),\n"
              "                     (create_model, 'hf-hub:timm-denseres/resnet110.fmnist')):\n"
              "    try:\n        create(name, pretrained=True)\n"
              "    except Exception as e:\n"
              "        chained = e.__cause__ or (e.__context__ and not e.__suppress_context__)\n"
              "        print(type(e).__name__, e, '<chained>' if chained else '', '<end>')\n")
    proc = _run(script, [], {'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HUB_CACHE': str(tmp_path)})
    errors = proc.stdout.split('<end>')[:2]
    assert len(errors) == 2, proc.stdout + proc.stderr[-2000:]
    for message in errors:
        assert message.strip().startswith('PretrainedWeightsError'), message
        assert 'the Hugging Face Hub (http://127.0.0.1:9) could not be reached' in message
        for way_out in (BUNDLED_WAY_OUT, "'local-dir:DIR'", 'HF_ENDPOINT'):
            assert way_out in message, way_out
    assert 'Retrying' not in proc.stderr
    assert '<chained>' not in proc.stdout  # the HTTP client's traceback would only bury the message


# ---------------------------------------------------------------------------------------------------------------
# warm starts


def test_warm_start_from_resnet34_matches_its_logits(offline_run):
    result = offline_run['results']['warm']
    assert result.get('ok'), result
    assert result['v_logits'] == [P.WARM_START_GATE_LOGIT]
    diff = (offline_run['logits']['warm'] - offline_run['base_logits']['warm']).abs().max().item()
    assert diff < TOL, diff


def test_warm_start_gate_logit_is_a_choice(offline_run):
    """gate_logit=6 reaches every gate and trades exactness for trainable gates: the logits move away."""
    result = offline_run['results']['warm_gate6']
    assert result['v_logits'] == [6.0]
    base = offline_run['base_logits']['warm']
    exact = (offline_run['logits']['warm'] - base).abs().max().item()
    loose = (offline_run['logits']['warm_gate6'] - base).abs().max().item()
    assert loose > 100 * exact and loose > TOL


@pytest.mark.skipif(not HAS_MNV2_WARM, reason='densemobilenetv2_n4 has no warm-start tag')
def test_warm_start_from_mobilenetv2_loads_by_its_tag(offline_run):
    """Every mobilenetv2_100 weight is mapped (a fit error would fail the load) and the gates are at identity."""
    result = offline_run['results']['warm_mnv2']
    assert result.get('ok'), result
    assert result['v_logits'] == [P.WARM_START_GATE_LOGIT]
    assert offline_run['logits']['warm_mnv2'].shape == offline_run['base_logits']['warm_mnv2'].shape


@pytest.mark.skipif(not HAS_MNV2_WARM, reason='densemobilenetv2_n4 has no warm-start tag')
def test_mobilenetv2_warm_start_is_exact_where_mobilenetv2_has_a_skip():
    """Why the MobileNetV2 warm start is approximate, block by block: with identity gates a dense block computes
    timm's block where timm has a skip, and timm's block plus the parameter-free shortcut where it has none.
    Each dense block's input and output are read with hooks (the history's latest output)."""
    base = _random_model('mobilenetv2_100', seed=4)
    dense = timm.create_model('densemobilenetv2_n4').eval()
    dense.load_state_dict(P.warm_start_state_dict(base.state_dict(), dense))
    base_blocks = [b for stage in base.blocks for b in stage]
    dense_blocks = [b for stage in dense.blocks for b in stage]
    assert len(base_blocks) == len(dense_blocks) == 17
    seen = []
    hooks = [d.register_forward_hook(lambda m, inputs, output: seen.append((inputs[0].outputs[-1], output.outputs[-1])))
             for d in dense_blocks]
    with torch.no_grad():
        dense(_input((2, 3, 64, 64), seed=7))
        for i, (b, d, (x, out)) in enumerate(zip(base_blocks, dense_blocks, seen)):
            expected = b(x) if b.has_skip else b(x) + reference_adjust(x, d.out_chs, d.pool)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4, msg=f'block {i}')
    for h in hooks:
        h.remove()
    assert len(seen) == 17 and sum(not b.has_skip for b in base_blocks) == 7  # the first block of each stage


def test_warm_start_state_dict_and_gate_logit_misuse():
    """The mapping behind the warm tags, on its own: plain ResNet-110 weights into DenseResNet-110."""
    base = _random_model('resnet110', seed=5, zero_init_last=False)
    x = _input((2, 3, 32, 32), seed=6)
    dense = timm.create_model('denseresnet110_n2')
    dense.load_state_dict(P.warm_start_state_dict(base.state_dict(), dense))
    # in float64: the mapping's own error (the shut gates' leak), without float32's rounding through 110 blocks,
    # which moves with the CPU's convolution kernels (logits of about 40 here)
    x, base, dense = x.double(), base.double(), dense.double()
    assert (_logits(dense, x) - _logits(base, x)).abs().max().item() < TOL
    with pytest.raises(ValueError, match='gate_logit is for warm-start tags'):
        timm.create_model('denseresnet110_n4', gate_logit=6.0)


# ---------------------------------------------------------------------------------------------------------------
# failure modes (local folders: no Hub involved)


def test_unknown_tag():
    message = _error(lambda: timm.create_model('denseresnet110_n4.nope', pretrained=True))
    assert "Unknown pretrained tag 'nope' for denseresnet110_n4" in message
    assert FM in message and "timm.list_pretrained('denseresnet110_n4*')" in message


def test_no_weights_for_the_untagged_model():
    message = _error(lambda: timm.create_model('denseresnet110_n4', pretrained=True))
    assert 'denseresnet110_n4 has no pretrained weights' in message and FM in message


def _folder_with_weights(published, tmp_path: Path, name: str, model: nn.Module) -> Path:
    """The published config and card with another model's weights, under a name with no recorded checksum and
    with their checksum in config.json: only the fit check can object."""
    folder = _copy_folder(published['folder'], tmp_path / name)
    save_for_hf(model, tmp_path / 'other', safe_serialization=True)
    shutil.copyfile(tmp_path / 'other' / P.WEIGHTS_FILE, folder / P.WEIGHTS_FILE)
    config = json.loads((folder / 'config.json').read_text())
    config[P.CONFIG_SHA256_KEY] = P.sha256_file(folder / P.WEIGHTS_FILE)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


# a checkpoint of another model in the published folder: (model name, its kwargs, what the error must say)
WRONG_CHECKPOINTS = {
    'plain': ('resnet110.fmnist', {}, [
        'The weights in {weights} do not fit denseresnet110_n4',
        'keys of the model are missing from the checkpoint: layer1.0.gate.fc1.weight',
        'no Gate-Module weights']),
    # block 3 mixes min(N, 3) inbounds: (3 + 1) * 16 gate inputs for N=4, (2 + 1) * 16 for N=2
    'other_n': ('denseresnet110_n2', dict(num_classes=10, in_chans=1), [
        'layer1.2.gate.fc1.weight: checkpoint (8, 48, 1, 1), model (8, 64, 1, 1)',
        'Only Gate-Module widths differ: the checkpoint is for another N']),
    'classes': ('denseresnet110_n4', dict(num_classes=100, in_chans=1), [
        'fc.weight: checkpoint (100, 64), model (10, 64)',
        'fc.bias: checkpoint (100,), model (10,)',
        'Its classifier has 100 classes but its config says 10']),
}


@pytest.mark.parametrize('case', list(WRONG_CHECKPOINTS))
def test_checkpoint_of_another_model(published, tmp_path, case):
    name, kwargs, expected = WRONG_CHECKPOINTS[case]
    folder = _folder_with_weights(published, tmp_path, case, timm.create_model(name, **kwargs))
    message = _error(lambda: timm.create_model(f'local-dir:{folder}', pretrained=True))
    for text in expected:
        assert text.format(weights=folder / P.WEIGHTS_FILE) in message


@pytest.mark.parametrize('damage', ['truncated', 'header'])
def test_corrupt_safetensors(published, tmp_path, damage):
    folder = _copy_folder(published['folder'], tmp_path / 'corrupt')
    path = folder / P.WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else b'\xff' * 16 + data[16:])
    message = _error(lambda: timm.create_model(f'local-dir:{folder}', pretrained=True))
    assert f'({path}) is not a valid safetensors file' in message and 'truncated or corrupt' in message


def test_checksum_catches_a_file_that_still_parses(published, tmp_path, record):
    """A flipped byte in the tensor data loads without complaint; only a checksum sees it: the one PUBLISHED
    records for the folder's name, and the one the folder's config.json carries, under any name."""
    record(FM, None)
    for name in (FM, 'renamed copy'):
        folder = _copy_folder(published['folder'], tmp_path / name)
        path = folder / P.WEIGHTS_FILE
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
        message = _error(lambda: timm.create_model(f'local-dir:{folder}', pretrained=True))
        assert f'{path} has sha256 {P.sha256_file(path)}' in message
        assert f'its {folder / "config.json"} records {published["sha256"]}' in message
    record(FM, published['sha256'])
    message = _error(lambda: timm.create_model(f'local-dir:{tmp_path / FM}', pretrained=True))
    assert f'Checksum mismatch for {FM}' in message and f'recorded {published["sha256"]} for the published' in message


def test_other_num_classes_and_in_chans_are_adapted(published):
    """timm's usual adaptation: a new classifier, and the gray first conv spread over RGB, so a gray image
    replicated over three channels gives the 1-channel model's features."""
    source = f"local-dir:{published['staged']}"
    gray = timm.create_model(source, pretrained=True).eval()
    rgb = timm.create_model(source, pretrained=True, num_classes=5, in_chans=3).eval()
    assert rgb.fc.out_features == 5 and rgb.conv1.in_channels == 3
    x = published['x']
    with torch.no_grad():
        expected = gray.forward_features(x)
        got = rgb.forward_features(x.repeat(1, 3, 1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert rgb(x.repeat(1, 3, 1, 1)).shape == (2, 5)


# ---------------------------------------------------------------------------------------------------------------
# the repo's own weights/ folders (none until the real checkpoints are exported)

WEIGHTS_FOLDERS = sorted(p for p in (REPO_ROOT / 'weights').glob('*') if (p / P.WEIGHTS_FILE).exists())
# as recorded in the package: the module fixture `published` replaces the fmnist entry while this module runs
RECORDED = dict(P.PUBLISHED)


@pytest.mark.parametrize('folder', WEIGHTS_FOLDERS, ids=[p.name for p in WEIGHTS_FOLDERS])
def test_weights_folder_is_recorded_and_loads(folder, monkeypatch):
    assert sorted(p.name for p in folder.iterdir()) == sorted(P.HUB_FILES)
    assert get_pretrained_cfg(folder.name).hf_hub_id == P.hub_repo_id(folder.name)
    sha256 = P.sha256_file(folder / P.WEIGHTS_FILE)
    assert RECORDED[folder.name].sha256 == sha256, 'record it in PUBLISHED'
    assert json.loads((folder / 'config.json').read_text())[P.CONFIG_SHA256_KEY] == sha256
    monkeypatch.setitem(P.PUBLISHED, folder.name, RECORDED[folder.name])
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert model.pretrained_cfg['tag'] == folder.name.split('.', 1)[1]


@pytest.mark.parametrize('name', sorted(RECORDED))
def test_published_line_is_a_registered_tag_with_a_sha256(name):
    assert get_pretrained_cfg(name).hf_hub_id == P.hub_repo_id(name)
    assert RECORDED[name].dataset in P.DATASETS
    assert re.fullmatch('[0-9a-f]{64}', RECORDED[name].sha256)


def test_published_lines_quoted_in_the_docs_are_the_recorded_ones():
    """A PUBLISHED line shown in a doc is copied by users: it must be today's, not one of a replaced checkpoint."""
    line = re.compile(r"'([\w.]+)': Published\('(\w+)', '([0-9a-f]{64})'(?:, gate_logit_scale=([\d.]+))?\)")
    docs = [REPO_ROOT / 'README.md', REPO_ROOT / 'MODEL_CARD.md', *sorted((REPO_ROOT / 'docs').glob('*.md')),
            *sorted((REPO_ROOT / 'weights').glob('*/README.md'))]
    quoted = [(doc.name, *m.groups()) for doc in docs for m in line.finditer(doc.read_text())]
    assert quoted, 'the docs show no PUBLISHED line any more: drop this test'
    for doc, name, dataset, sha256, scale in quoted:
        assert RECORDED.get(name) == P.Published(dataset, sha256, float(scale or 1.0)), f'{doc}: {name}'


# every bundled checkpoint by its tag from a Hugging Face cache (HF_HUB_OFFLINE=1) and by local-dir:
BY_TAG_AND_FOLDER = '''
import json, sys, timm, torch
import timm_denseres  # noqa: F401
names, weights, x = json.loads(sys.argv[1]), sys.argv[2], torch.load(sys.argv[3])
out = {}
for name in names:
    by_tag = timm.create_model(name, pretrained=True).eval()
    by_folder = timm.create_model(f'local-dir:{weights}/{name}', pretrained=True).eval()
    with torch.no_grad():
        logits = by_tag(x)
        out[name] = dict(tag=by_tag.pretrained_cfg['tag'], diff=(logits - by_folder(x)).abs().max().item(),
                         spread=logits.std().item())
print(json.dumps(out))
'''


def test_bundled_checkpoints_load_by_tag_offline_as_from_their_folder(tmp_path):
    cache = tmp_path / 'hf-cache'
    for folder in WEIGHTS_FOLDERS:
        fill_hf_cache(cache, P.hub_repo_id(folder.name), folder)
    torch.save(_input((4, 1, 28, 28), seed=5), tmp_path / 'x.pt')
    names = [folder.name for folder in WEIGHTS_FOLDERS]
    proc = _run(BY_TAG_AND_FOLDER, [json.dumps(names), REPO_ROOT / 'weights', tmp_path / 'x.pt'],
                {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(names) and names
    for name, result in results.items():
        assert result['tag'] == name.split('.', 1)[1]
        assert result['diff'] == 0.0 and result['spread'] > 0.1, (name, result)


def test_a_checkpoint_with_the_models_channels_logs_no_conversion(caplog):
    """A 1-channel checkpoint into a 1-channel model: timm's 'Converted input conv ... from 3 to 1' would be wrong
    (nothing is converted), so it is not logged; into a 3-channel model the gray kernel is spread over RGB."""
    folder = REPO_ROOT / 'weights' / 'denseresnet20_n4.fmnist'
    with caplog.at_level('INFO'):
        gray = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert gray.conv1.in_channels == 1
    assert 'Loading pretrained weights' in caplog.text and 'Converted input conv' not in caplog.text
    rgb = timm.create_model(f'local-dir:{folder}', pretrained=True, in_chans=3)
    torch.testing.assert_close(rgb.conv1.weight.sum(1, keepdim=True), gray.conv1.weight)


def test_checkpoints_keep_the_gate_scale_they_were_trained_with(tmp_path):
    """The registered DenseResNets now train their gates at gate_logit_scale 10; a checkpoint made before (a
    config.json without the key) loads at scale 1, one that records its scale at that scale, and asking for another
    scale with its weights is refused."""
    assert timm.create_model('denseresnet20_n4').gate_logit_scale == 10.0
    old = _random_model('denseresnet20_n4', seed=2, num_classes=10, in_chans=1, gate_logit_scale=1.0)
    old.pretrained_cfg = P.with_data_config(old.pretrained_cfg, P.FASHION_MNIST)
    E.write_folder(old, tmp_path / 'denseresnet20_n4.old', {})  # a config.json without the key
    assert timm.create_model(f'local-dir:{tmp_path / "denseresnet20_n4.old"}', pretrained=True).gate_logit_scale == 1.0
    with pytest.raises(ValueError, match='trained with gate_logit_scale=1'):
        timm.create_model(f'local-dir:{tmp_path / "denseresnet20_n4.old"}', pretrained=True, gate_logit_scale=10.0)
    # named after the checkpoint without its weights, as timm's validate.py builds a run fine-tuned from it before
    # loading the run's --checkpoint: the checkpoint's scale, so the run's weights mean what they meant in training
    unloaded = timm.create_model(f'local-dir:{tmp_path / "denseresnet20_n4.old"}')
    assert unloaded.gate_logit_scale == 1.0
    unloaded.load_state_dict(old.state_dict())
    x = _input((2, 1, 28, 28))
    assert torch.equal(_logits(unloaded.eval(), x), _logits(old, x))
    asked = timm.create_model(f'local-dir:{tmp_path / "denseresnet20_n4.old"}', gate_logit_scale=3.0)
    assert asked.gate_logit_scale == 3.0  # without weights, an explicit scale is the user's
    model = _random_model('denseresnet20_n4', seed=3, num_classes=10, in_chans=1, gate_logit_scale=4.0)
    model.pretrained_cfg = P.with_data_config(model.pretrained_cfg, P.FASHION_MNIST)
    E.write_folder(model, tmp_path / 'denseresnet20_n4.mine', {'gate_logit_scale': model.gate_logit_scale})
    loaded = timm.create_model(f'local-dir:{tmp_path / "denseresnet20_n4.mine"}', pretrained=True).eval()
    x = _input((2, 1, 28, 28))
    assert loaded.gate_logit_scale == 4.0 and torch.equal(_logits(loaded, x), _logits(model, x))


def test_plot_gates_says_how_far_a_checkpoints_gates_are_from_a_fresh_models(tmp_path):
    """scripts/plot_gates.py compares the checkpoint's mean mixing weights with those of an untrained model of the
    same architecture and gate scale. With fc2's weight at zero (the default start) a gate's mix is exactly what
    its bias gives (start_mix), so the expected distance is known without data."""
    from timm_denseres.gate_stats import dense_gates, mix_shift, start_mix
    fresh = timm.create_model('denseresnet20_n4', num_classes=10, in_chans=1, gate_logit_scale=4.0).eval()
    moved = copy.deepcopy(fresh)
    with torch.no_grad():
        for k, gate in enumerate(dense_gates(moved).values()):
            gate.fc2.bias.view(gate.num_inbounds + 1, gate.channels)[1] -= 0.1 * (k % 3)  # the shortcut's logits
    expected = mix_shift({b: start_mix(g) for b, g in dense_gates(moved).items()},
                         {b: start_mix(g) for b, g in dense_gates(fresh).items()})
    assert expected > 0.01
    moved.pretrained_cfg = P.with_data_config(moved.pretrained_cfg, P.FASHION_MNIST)
    E.write_folder(moved, tmp_path / 'denseresnet20_n4.moved', {'gate_logit_scale': 4.0})
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'scripts' / 'plot_gates.py'), '--model',
         f'local-dir:{tmp_path / "denseresnet20_n4.moved"}', '--data-dir', str(SAMPLE), '--out',
         str(tmp_path / 'figures' / 'gates.png')], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'figures' / 'gates.png').stat().st_size > 0  # its folder made on the way
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith('mean |w - w of a fresh denseresnet20_n4| over blocks and inbounds: ')
    assert abs(float(line.rsplit(' ', 1)[1]) - expected) < 1e-4, (line, expected)


@pytest.mark.parametrize('model, data, message', [
    ('local-dir:weights/resnet20.fmnist', 'sample', 'resnet20 has no Gate-Modules (a baseline)'),
    ('denseresnet20_nX', 'sample', "timm knows no model 'denseresnet20_nX'"),
    ('local-dir:weights/denseresnet20_n4.fmnist', 'missing', 'No image folder at'),
])
def test_plot_gates_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, model, data, message):
    out = tmp_path / 'new' / 'gates.png'
    data_dir = SAMPLE if data == 'sample' else tmp_path / 'missing'
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'scripts' / 'plot_gates.py'), '--model', model, '--data-dir', str(data_dir),
         '--out', str(out)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 2 and result.stderr.startswith('error: ') and message in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr and not out.parent.exists()


@pytest.mark.parametrize('name', ['denseresnet20_n4.fmnist', 'denseresnet56_n4.fmnist', 'denseresnet110_n4.fmnist'])
def test_the_bundled_checkpoints_of_the_default_have_gates_that_learned(name, monkeypatch):
    """Trained at the default gate scale, their mean mixing weights on the bundled sample are at least 0.05 from an
    untrained model's, on average over blocks and inbounds (what scripts/plot_gates.py prints)."""
    from timm_denseres.evaluate import make_loader
    from timm_denseres.gate_stats import mix_shift
    spec = importlib.util.spec_from_file_location('plot_gates', REPO_ROOT / 'scripts' / 'plot_gates.py')
    plot_gates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_gates)
    monkeypatch.setitem(P.PUBLISHED, name, RECORDED[name])  # the real record, if the `published` fixture runs
    model = timm.create_model(f'local-dir:{REPO_ROOT / "weights" / name}', pretrained=True).eval()
    assert model.gate_logit_scale == 10.0
    loader = make_loader(model, str(SAMPLE), 'validation', batch_size=100)
    fresh = plot_gates.fresh_like(model)
    assert mix_shift(plot_gates.mean_mix(model, loader), plot_gates.mean_mix(fresh, loader)) >= 0.05


@pytest.mark.parametrize('name, dense', [('resnet20.fmnist', False), ('denseresnet20_n4.fmnist', True)])
def test_a_cards_words_fit_the_model(name, dense):
    model = timm.create_model(name, pretrained=False)
    card = E.model_card(name, model, '0' * 64, 'state_dict', None, P.DATASETS['fmnist'], None)
    assert ('denseresnet' in card.data.tags) == dense
    assert ('A Dense Residual Network from' in card.text) == dense
    assert ('plain baseline (no Gate-Modules' in card.text) != dense
