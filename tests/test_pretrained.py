"""Pretrained weights (issue 4): tagged cfgs, export and publish, loading three ways offline, warm starts, and a
clear message for every way loading can fail.

Nothing here reaches the network or mocks huggingface_hub. ``local-dir:`` loads read a folder. Tag and ``hf-hub:``
loads read a Hugging Face cache that the test fills in huggingface_hub's own layout (refs/main -> snapshot ->
blobs), from a subprocess started with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set: huggingface_hub reads both when it
is imported, so they cannot be changed for an already running interpreter. One subprocess does all cached loads
(``offline_run``); the tests read its results.

Weights are random (BatchNorm statistics randomized so that no block is trivially zero), never trained; they only
live in tmp dirs. The checksum of such a file is put into ``SHA256`` by the test itself.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from timm.models import get_pretrained_cfg, save_for_hf

import timm_denseres  # noqa: F401  registers the models
from helpers import randomize_norms
from timm_denseres import pretrained as P

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / 'scripts'
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import export_checkpoint  # noqa: E402
import publish  # noqa: E402

FM = 'denseresnet110_n4.fmnist'
FM_REPO = f'{P.HUB_ORG}/{FM}'
WARM = 'denseresnet34_n6.a1_in1k_warm'
MNV2_WARM = 'densemobilenetv2_n4.ra_in1k_warm'
HAS_MNV2_WARM = MNV2_WARM in timm.list_pretrained('densemobilenetv2*')
TOL = 1e-4  # the bound on warm-start logits


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _random_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(timm.create_model(name, **kwargs), seed + 1)


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
    model = _random_model(FM, seed=0)
    ema = _random_model(FM, seed=10)  # the EMA weights are the ones to publish
    _save_train_checkpoint(tmp / 'model_best.pth.tar', model, ema, 'denseresnet110_n4')
    folder = export_checkpoint.export(tmp / 'model_best.pth.tar', 'fmnist', out_dir=tmp / 'weights', top1=91.25,
                                      train_command='python scripts/train.py --config recipes/fashion_mnist.yaml')
    sha256 = P.sha256_file(folder / P.WEIGHTS_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(P.SHA256, FM, sha256)
        staged = publish.publish(folder, dry_run=True, staging_dir=tmp / 'stage')
        x = _input((2, 1, 28, 28))
        yield dict(tmp=tmp, folder=folder, staged=staged, x=x, ema_logits=_logits(ema, x),
                   model_logits=_logits(model, x), sha256=sha256)


@pytest.fixture
def record(monkeypatch):
    """Record a checksum in SHA256 (None: none recorded) for the duration of a test."""
    def _record(name, sha):
        if sha is None:
            monkeypatch.delitem(P.SHA256, name, raising=False)
        else:
            monkeypatch.setitem(P.SHA256, name, sha)
    return _record


# ---------------------------------------------------------------------------------------------------------------
# the subprocess that loads from a pre-filled HF cache with HF_HUB_OFFLINE=1

OFFLINE_SCRIPT = r'''
import json, sys
import timm, torch
import timm_denseres
from timm_denseres import pretrained as P

cfg = json.loads(open(sys.argv[1]).read())
inputs = torch.load(cfg['inputs'])
results, tensors = {}, {}

def logits(key, name, x, **kwargs):
    try:
        model = timm.create_model(name, pretrained=True, **kwargs).eval()
        with torch.no_grad():
            tensors[key] = model(x)
        gates = [m.fc2.bias.view(-1, m.channels)[0, 0].item() for n, m in model.named_modules() if n.endswith('.gate')]
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
P.SHA256[cfg['name']] = cfg['sha256']
for route, name in routes.items():
    logits(route, name, inputs['fm'])
P.SHA256[cfg['name']] = '0' * 64
for route, name in routes.items():
    logits('bad_sum_' + route, name, inputs['fm'])
P.SHA256[cfg['name']] = cfg['sha256']
logits('warm', cfg['warm'], inputs['in'])
logits('warm_gate6', cfg['warm'], inputs['in'], gate_logit=6.0)
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
    torch.save({'fm': published['x'], 'in': x_in}, tmp / 'inputs.pt')
    cfg = dict(name=FM, repo_id=FM_REPO, staged=str(published['staged']), sha256=published['sha256'], warm=WARM,
               mnv2_warm=MNV2_WARM if HAS_MNV2_WARM else None, inputs=str(tmp / 'inputs.pt'), out=str(tmp / 'out.pt'))
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
    assert WARM in listed
    assert set(P.WARM_STARTS) >= {WARM}


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
    card = ModelCard.load(folder / 'README.md')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert card.data.datasets == ['zalando-datasets/fashion_mnist'] and card.data.metrics == ['accuracy']
    assert card.data.eval_results[0].metric_value == 91.25
    assert 'Dense Residual Networks for Image Classification' in card.text
    assert P.sha256_file(folder / P.WEIGHTS_FILE) in card.text
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    logits = _logits(model, published['x'])
    assert torch.equal(logits, published['ema_logits'])
    assert not torch.allclose(logits, published['model_logits'])


def test_export_model_weights_and_refusals(published, tmp_path, record):
    ckpt = published['tmp'] / 'model_best.pth.tar'
    record(FM, None)  # other weights under the same name
    folder = export_checkpoint.export(ckpt, 'fmnist', weights='model', out_dir=tmp_path)
    assert torch.equal(_logits(timm.create_model(f'local-dir:{folder}', pretrained=True), published['x']),
                       published['model_logits'])
    with pytest.raises(export_checkpoint.ExportError, match='exists and is not empty'):
        export_checkpoint.export(ckpt, 'fmnist', out_dir=tmp_path)
    with pytest.raises(export_checkpoint.ExportError, match='not a registered pretrained cfg'):
        export_checkpoint.export(ckpt, 'cifar100', out_dir=tmp_path)
    with pytest.raises(export_checkpoint.ExportError, match='not published by the project'):
        export_checkpoint.export(ckpt, 'a1_in1k_warm', model_name='denseresnet34_n6', out_dir=tmp_path)
    # trained with another normalisation than the tag says: refused, naming the field
    ck = torch.load(ckpt, weights_only=False)
    ck['args'].mean = [0.5]
    torch.save(ck, tmp_path / 'other.pth.tar')
    with pytest.raises(export_checkpoint.ExportError, match=r'mean: trained with \[0.5\]'):
        export_checkpoint.export(tmp_path / 'other.pth.tar', 'fmnist', out_dir=tmp_path / 'x')


def test_publish_dry_run_stages_exactly_the_folder(published, tmp_path):
    staged = published['staged']
    assert staged.name == FM
    for name in P.HUB_FILES:
        assert (staged / name).read_bytes() == (published['folder'] / name).read_bytes()
    assert sorted(p.name for p in staged.iterdir()) == sorted(P.HUB_FILES)
    # a stray file is not uploaded: refused
    bad = _copy_folder(published['folder'], tmp_path / FM)
    (bad / 'notes.txt').write_text('x')
    with pytest.raises(publish.PublishError, match='notes.txt'):
        publish.publish(bad, dry_run=True, staging_dir=tmp_path / 'stage')


def test_publish_refuses_a_wrong_name_or_checksum(published, tmp_path, record):
    with pytest.raises(publish.PublishError, match='repo name must be'):
        publish.publish(published['folder'], repo_id='timm-denseres/resnet110.fmnist', dry_run=True,
                        staging_dir=tmp_path)
    record(FM, 'f' * 64)
    with pytest.raises(publish.PublishError, match=f'{"f" * 64} is recorded'):
        publish.publish(published['folder'], dry_run=True, staging_dir=tmp_path)


def test_publish_needs_a_recorded_checksum_to_upload(published, tmp_path, record):
    record(FM, None)
    with pytest.raises(publish.PublishError, match='no sha256 recorded'):
        publish.publish(published['folder'], dry_run=False, staging_dir=tmp_path)


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


def test_hub_unreachable_offline_says_what_to_do(offline_run):
    for key in ('not_cached_tag', 'not_cached_hf_hub'):
        message = offline_run['results'][key]['error']
        assert message.startswith('PretrainedWeightsError'), message
        assert 'offline mode is on (HF_HUB_OFFLINE=1)' in message
        assert 'timm-denseres/resnet110.fmnist is not in the Hugging Face cache' in message
        assert str(offline_run['cache']) in message
        for way_out in ('HF_HUB_OFFLINE unset', 'HF_ENDPOINT', "'local-dir:DIR'"):
            assert way_out in message, (key, way_out)


@pytest.mark.slow
def test_hub_unreachable_online_says_what_to_do(tmp_path):
    """Not offline, but the endpoint refuses connections (huggingface_hub retries for ~20 s per file)."""
    script = ("import timm, timm_denseres\n"
              "try:\n    timm.create_model('resnet110.fmnist', pretrained=True)\n"
              "except Exception as e:\n    print(type(e).__name__, e)\n")
    proc = _run(script, [], {'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HUB_CACHE': str(tmp_path)})
    assert proc.stdout.startswith('PretrainedWeightsError'), proc.stdout + proc.stderr[-2000:]
    assert 'the Hugging Face Hub (http://127.0.0.1:9) could not be reached' in proc.stdout
    assert "'local-dir:DIR'" in proc.stdout and 'HF_ENDPOINT' in proc.stdout


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
    Each dense block's input and output are read with hooks (``history[-1]`` is the latest output)."""
    from timm_denseres.gate import adjust_inbound
    base = _random_model('mobilenetv2_100', seed=4)
    dense = timm.create_model('densemobilenetv2_n4').eval()
    dense.load_state_dict(P.warm_start_state_dict(base.state_dict(), dense))
    base_blocks = [b for stage in base.blocks for b in stage]
    dense_blocks = [b for stage in dense.blocks for b in stage]
    assert len(base_blocks) == len(dense_blocks) == 17
    seen = []
    hooks = [d.register_forward_hook(lambda m, inputs, output: seen.append((inputs[0][-1], output[-1])))
             for d in dense_blocks]
    with torch.no_grad():
        dense(_input((2, 3, 64, 64), seed=7))
        for i, (b, d, (x, out)) in enumerate(zip(base_blocks, dense_blocks, seen)):
            expected = b(x) if b.has_skip else b(x) + adjust_inbound(x, d.in_chs, d.out_chs, d.pool)
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
    """The published config and card with another model's weights, under a name with no recorded checksum."""
    folder = _copy_folder(published['folder'], tmp_path / name)
    save_for_hf(model, tmp_path / 'other', safe_serialization=True)
    shutil.copyfile(tmp_path / 'other' / P.WEIGHTS_FILE, folder / P.WEIGHTS_FILE)
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
    """A flipped byte in the tensor data loads without complaint; only the checksum sees it."""
    folder = _copy_folder(published['folder'], tmp_path / FM)
    path = folder / P.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    record(FM, None)
    timm.create_model(f'local-dir:{folder}', pretrained=True)  # nothing recorded: loads
    record(FM, published['sha256'])
    message = _error(lambda: timm.create_model(f'local-dir:{folder}', pretrained=True))
    assert f'Checksum mismatch for {FM}: {path} has sha256 {P.sha256_file(path)}' in message
    assert f'recorded {published["sha256"]}' in message


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
RECORDED_SHA256 = dict(P.SHA256)


@pytest.mark.parametrize('folder', WEIGHTS_FOLDERS, ids=[p.name for p in WEIGHTS_FOLDERS])
def test_weights_folder_is_recorded_and_loads(folder, monkeypatch):
    assert sorted(p.name for p in folder.iterdir()) == sorted(P.HUB_FILES)
    assert get_pretrained_cfg(folder.name).hf_hub_id == P.hub_repo_id(folder.name)
    assert RECORDED_SHA256.get(folder.name) == P.sha256_file(folder / P.WEIGHTS_FILE), 'record it in SHA256'
    monkeypatch.setitem(P.SHA256, folder.name, RECORDED_SHA256[folder.name])
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert model.pretrained_cfg['tag'] == folder.name.split('.', 1)[1]


@pytest.mark.parametrize('name', sorted(RECORDED_SHA256))
def test_recorded_checksum_belongs_to_a_published_tag(name):
    assert get_pretrained_cfg(name).hf_hub_id == P.hub_repo_id(name)
    assert len(RECORDED_SHA256[name]) == 64 and int(RECORDED_SHA256[name], 16) >= 0
