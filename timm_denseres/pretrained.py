"""Pretrained weights, the timm way: tagged cfgs that point at the Hugging Face Hub, checked loading, warm starts.

Every published checkpoint is one entry of ``PUBLISHED``, ``'{model}.{tag}': Published(dataset, sha256)``: the
family files' ``default_cfgs`` get its tagged pretrained_cfg from it (:func:`untagged_default`), with the data
config of its dataset (``DATASETS``) and ``hf_hub_id = timm-denseres/{model}.{tag}`` (the project's Hub
organisation, ``HUB_ORG``); the sha256 is checked on every load. Once ``timm_denseres`` is imported, timm loads
it three ways::

    timm.create_model('denseresnet110_n4.fmnist', pretrained=True)                   # tag (Hub or HF cache)
    timm.create_model('hf-hub:timm-denseres/denseresnet110_n4.fmnist', pretrained=True)
    timm.create_model('local-dir:weights/denseresnet110_n4.fmnist', pretrained=True)

All three routes end in the model's builder, which calls :func:`build_model_with_pretrained` here instead of
timm's ``build_model_with_cfg`` directly. It still lets timm find, download and read the weights; on top it

- hooks into timm's loading through the one hook timm offers, ``pretrained_filter_fn`` (:class:`LoadChecks`):
  the sha256 of the weights file is checked (against ``PUBLISHED`` for a published name, and against the
  ``weights_sha256`` its folder's ``config.json`` carries, wherever the folder is), warm-start tags get their
  gates, a 1-channel first conv is brought to timm's 3-channel convention, and a checkpoint that does not fit is
  refused with the keys that differ;
- asks the Hub once, without huggingface_hub's retries, before timm downloads anything, so an unreachable Hub
  (or ``HF_HUB_OFFLINE=1``) fails at once with a :class:`PretrainedWeightsError` that says what to do;
- turns what timm raises while reading (corrupt safetensors, unknown tag, no weights) into that error too. That
  part has to be a wrapper around timm's builder: the filter only runs after timm has read the file.

One route is out of the builder's reach: for ``hf-hub:`` names timm downloads ``config.json`` in
``timm.create_model`` before any model code runs, so with no Hub and nothing cached the error is
huggingface_hub's own. :func:`create_model` here is ``timm.create_model`` with that error translated too.

Warm starts (``*_warm`` tags, :func:`warm_start_cfgs`): the weights are timm's own ImageNet checkpoint of the
base network (e.g. ``timm/resnet34.a1_in1k``), downloaded by its ``hf_hub_id``; the Gate-Modules, which that
checkpoint lacks, are set to identity with a logit of ``WARM_START_GATE_LOGIT`` (kwarg ``gate_logit``).
"""
import hashlib
import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError)
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, get_pretrained_cfg, is_model_pretrained,
    parse_model_name, resolve_pretrained_cfg, split_model_name_tag)
from timm.models._hub import hf_split

__all__ = [
    'HUB_ORG', 'WEIGHTS_FILE', 'HUB_FILES', 'CONFIG_SHA256_KEY', 'Dataset', 'DATASETS', 'Published', 'PUBLISHED',
    'WARM_STARTS', 'WARM_START_GATE_LOGIT', 'FASHION_MNIST', 'PretrainedWeightsError', 'hub_repo_id',
    'dataset_of_tag', 'with_data_config', 'published_cfg', 'published_cfgs', 'hub_cfgs', 'warm_start_cfgs',
    'untagged_default', 'sha256_file', 'checkpoint_name', 'weights_path', 'folder_sha256', 'verify_checksum',
    'warm_start_state_dict', 'check_state_dict_fits', 'LoadChecks', 'build_model_with_pretrained', 'create_model',
    'hub_error_message', 'bundled_folder',
]

HUB_ORG = 'timm-denseres'
"""The project's Hugging Face Hub organisation: checkpoint ``{model}.{tag}`` is repo ``timm-denseres/{model}.{tag}``."""

WEIGHTS_FILE = 'model.safetensors'
HUB_FILES = ('config.json', WEIGHTS_FILE, 'README.md')
"""Exactly the files of a published checkpoint (a ``weights/`` folder and its Hub repo)."""

CONFIG_SHA256_KEY = 'weights_sha256'
"""Top-level field of a checkpoint folder's ``config.json``: the sha256 of its ``model.safetensors``, so that the
folder carries its own checksum wherever it is copied to (timm ignores unknown top-level fields)."""

FASHION_MNIST: Dict[str, Any] = dict(
    num_classes=10, input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), crop_pct=1.0, interpolation='bilinear',
    label_names=('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                 'Ankle boot'),
)
"""Data config of the Fashion-MNIST checkpoints (mean/std of the train split; the whole 28x28 image at test)."""


class Dataset(NamedTuple):
    """What the checkpoints of a tag were trained on: the model card's metadata and the tagged cfg's data config."""
    name: str
    hub_id: Optional[str]  # the Hub dataset id, for the card's metadata
    split: str  # the split the card's accuracy is measured on
    description: str  # the tagged cfg's description
    data: Optional[Dict[str, Any]] = None  # data config and label names; None: the model's own untagged cfg's


DATASETS: Dict[str, Dataset] = {
    'fmnist': Dataset('Fashion-MNIST', 'zalando-datasets/fashion_mnist', 'test',
                      "Trained on Fashion-MNIST (10 classes, 28x28 grayscale) with timm's train.py.", FASHION_MNIST),
    # the untagged cfgs of the paper's models are these datasets' set-ups already
    'cifar100': Dataset('CIFAR-100', 'uoft-cs/cifar100', 'test', "Trained on CIFAR-100 with timm's train.py."),
    'in1k': Dataset('ImageNet-1k', 'ILSVRC/imagenet-1k', 'validation', "Trained on ImageNet-1k with timm's train.py."),
}
"""Datasets a tag can name: tag ``fmnist`` (or ``..._fmnist``, timm's ``a1_in1k`` style) claims Fashion-MNIST."""


class Published(NamedTuple):
    """A checkpoint of the project: what it was trained on, the checksum of its weights, and the gates' logit scale
    it was trained with (which the weights need: fc2's values are the logits divided by it)."""
    dataset: str  # a key of DATASETS
    sha256: str  # of its model.safetensors
    gate_logit_scale: float = 1.0


PUBLISHED: Dict[str, Published] = {
    # '{model}.{tag}': one line per checkpoint of the project's Hub organisation. timm_denseres.export prints the
    # line when it writes a folder; tests/test_pretrained.py checks every weights/ folder against it.
    'resnet110.fmnist': Published('fmnist', '9b2bd7baa38e440e9c461f12dbb50a58850873e2f9538f295b5c7406d08d11bc'),
    'denseresnet110_n4.fmnist': Published(
        'fmnist', '167450fba88e4bd616de9523cd9dcfc87b0115d83a538a0a9be59373e5f8f653', gate_logit_scale=10.0),
    'resnet20.fmnist': Published('fmnist', 'e98e005c1f5b147edc16d656a67733a87e13fb23910ef7ccd4114a9f93ae3ccc'),
    'denseresnet20_n4.fmnist': Published(
        'fmnist', '48b7961ac736e7498a4712bc723aef2677d704b05acf08b7fe21203a5904daec', gate_logit_scale=10.0),
    'resnet56.fmnist': Published('fmnist', 'c2f9b7b92b4a43da48617ce1c6ae9d5c883a4404462d13d085341200894d8cdc'),
    'denseresnet56_n4.fmnist': Published(
        'fmnist', 'cad4773b04091236f9a99d40436dd13a6db1c90ebca2d35ad57ce0a1348e67f6', gate_logit_scale=10.0),
}
"""The published checkpoints: their tagged cfgs are made from this table, and each load checks the sha256."""

WARM_STARTS: Dict[str, str] = {}
"""``{model}.{tag}`` of each warm-start cfg -> the timm checkpoint it starts from (filled by warm_start_cfgs)."""

WARM_START_GATE_LOGIT = 16.0
"""Gate logit of a warm start. With this logit v = sigmoid(16) = 1 - 1.1e-7 and the shortcut takes all but
~1e-7 of each softmax: the logits equal the base network's to ~1e-6 of their size (tools/warm_start_tradeoff.py;
tests/test_pretrained.py checks 1e-4). The price: gate gradients shrink by the same ~1e-7, so fine-tuning leaves
the gates at identity. Pass ``gate_logit=4`` to ``6`` for gates that train from the first step, at the cost of a
start that differs from the base network (MODEL_CARD.md has the measured trade-off)."""

# Hub errors that mean "could not get the file"; LocalEntryNotFoundError is what a missing network gives.
_HUB_ERRORS = (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError,
               OfflineModeIsEnabled)
_DATA_FIELDS = ('input_size', 'test_input_size', 'min_input_size', 'interpolation', 'crop_pct', 'test_crop_pct',
                'crop_mode', 'mean', 'std', 'num_classes', 'pool_size', 'test_pool_size')
_MAX_KEYS_SHOWN = 8


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Tagged cfgs


def hub_repo_id(name: str) -> str:
    """``'denseresnet110_n4.fmnist'`` -> ``'timm-denseres/denseresnet110_n4.fmnist'``."""
    return f'{HUB_ORG}/{name}'


def hub_cfgs(models: Iterable[str], tag: str, cfg: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Tagged cfgs ``{model}.{tag}`` of checkpoints published in the project's Hub organisation."""
    return {f'{m}.{tag}': dict(cfg, hf_hub_id=hub_repo_id(f'{m}.{tag}')) for m in models}


def dataset_of_tag(tag: Optional[str]) -> Optional[str]:
    """The key of ``DATASETS`` a tag names: ``'fmnist'`` -> ``'fmnist'``, ``'a1_in1k'`` -> ``'in1k'``, else None."""
    if not tag:
        return None
    for key in (tag, tag.rsplit('_', 1)[-1]):
        if key in DATASETS:
            return key
    return None


def with_data_config(base_cfg: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
    """``base_cfg`` with another data config (input size, mean/std, classes, ...); its ``pool_size`` (the final
    feature map) follows the input size, and test-time sizes that belonged to the old input are dropped."""
    cfg = dict(base_cfg, **data)
    for key in ('test_input_size', 'test_crop_pct', 'min_input_size', 'test_pool_size'):
        if key not in data:
            cfg.pop(key, None)
    old, new, pool = base_cfg.get('input_size'), cfg.get('input_size'), base_cfg.get('pool_size')
    if pool and old and new and 'pool_size' not in data:
        cfg['pool_size'] = tuple(math.ceil(p * n / o) for p, n, o in zip(pool, new[1:], old[1:]))
    return cfg


def published_cfg(name: str, base_cfg: Dict[str, Any], dataset: Optional[str] = None) -> Dict[str, Any]:
    """The tagged cfg of checkpoint ``name`` (``{model}.{tag}``) of the project's organisation: the model's
    untagged ``base_cfg`` with the data config of its dataset (``PUBLISHED``, or ``dataset``, a key of DATASETS)."""
    model, tag = split_model_name_tag(name)
    info = DATASETS[dataset or PUBLISHED[name].dataset]
    cfg = with_data_config(base_cfg, info.data or {})
    return hub_cfgs([model], tag, dict(cfg, description=info.description))[name]


def published_cfgs(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The tagged cfg of every checkpoint in ``PUBLISHED`` whose model has its untagged cfg in ``cfgs``."""
    return {name: published_cfg(name, cfgs[split_model_name_tag(name)[0]])
            for name in PUBLISHED if split_model_name_tag(name)[0] in cfgs}


def warm_start_cfgs(
        models: Iterable[str],
        source: str,
        base_cfg: Dict[str, Any],
        tag: Optional[str] = None,
        exact: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Tagged cfgs whose weights are timm's checkpoint ``source`` (e.g. ``'resnet34.a1_in1k'``), gates at identity.

    The data config (input size, crop, interpolation, mean/std) is the source's, read from timm's registry, so
    the warm-started model sees its inputs exactly as the source did. ``first_conv``, ``classifier``, licence and
    paper come from ``base_cfg`` (the dense model's own cfg). The tag defaults to ``{source tag}_warm``.
    ``exact=False`` says (in the description) that identity gates only approximate the source: the dense model
    has shortcuts where the source has none.
    """
    src = get_pretrained_cfg(source)
    if src is None or not src.hf_hub_id:
        raise ValueError(f'{source!r} is not a timm checkpoint with an hf_hub_id')
    tag = tag or f'{src.tag}_warm'
    data = {k: getattr(src, k) for k in _DATA_FIELDS if getattr(src, k) is not None}
    out = {}
    for model in models:
        name = f'{model}.{tag}'
        out[name] = dict(
            base_cfg, **data,
            hf_hub_id=src.hf_hub_id,  # no url: the weights come from the Hub, by id
            description=(f"Warm start: timm's {source} weights ({src.hf_hub_id}) with every Gate-Module at "
                         + (f'identity, so the model starts where {source} stands. ' if exact else
                            f'identity. Approximate: the blocks that have no skip in {source} keep their '
                            f'shortcut, so the start is near {source}, not at it. ')
                         + f'For fine-tuning; not trained as {model}.'),
        )
        WARM_STARTS[name] = source
    return out


def untagged_default(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """timm's ``generate_default_cfgs`` of a model family's cfgs and of their published checkpoints
    (:func:`published_cfgs`: a new ``PUBLISHED`` line is all a new checkpoint needs), the untagged cfg staying each
    model's default.

    timm makes the first tag *with weights* the default, so adding ``denseresnet110_n4.fmnist`` would turn plain
    ``create_model('denseresnet110_n4')`` into a 10-class, 1-channel Fashion-MNIST model. The paper's defaults
    (CIFAR-100, ImageNet) must not change when a checkpoint is published, so the untagged cfg is moved first.
    """
    out = generate_default_cfgs({**cfgs, **published_cfgs(cfgs)})
    for default_cfg in out.values():
        if '' in default_cfg.tags:
            default_cfg.tags.remove('')
            default_cfg.tags.appendleft('')
    return out


# ---------------------------------------------------------------------------------------------------------------
# Where the weights came from, and their checksum


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _is_file_source(cfg: Dict[str, Any]) -> bool:
    # timm's order (_resolve_pretrained_source): an explicit source, then state_dict, then file, then the Hub
    return cfg.get('source') not in ('hf-hub', 'local-dir') and cfg.get('state_dict') is None and bool(cfg.get('file'))


def _hub_source(cfg: Dict[str, Any]) -> Optional[Tuple[str, Optional[str]]]:
    """(repo id, revision) when timm downloads the weights from the Hub for this cfg (tag or ``hf-hub:``)."""
    if cfg.get('source') == 'local-dir' or _is_file_source(cfg) or cfg.get('state_dict') is not None:
        return None
    return hf_split(cfg['hf_hub_id']) if cfg.get('hf_hub_id') else None


def checkpoint_name(cfg: Dict[str, Any]) -> Optional[str]:
    """The ``{model}.{tag}`` a checkpoint is published as, which keys its line in ``PUBLISHED``.

    Tag route: the cfg's architecture and tag. ``hf-hub:timm-denseres/NAME``: NAME (another organisation's repo is
    not the project's). ``local-dir:DIR``: DIR's folder name (a ``weights/`` folder, a publish staging folder and
    ``hf download --local-dir`` all keep the repo name). So a user's own fine-tune, saved under another name, is
    held only to the checksum in its own config.json.
    """
    source = cfg.get('source')
    if source == 'hf-hub':
        org, _, name = hf_split(cfg['hf_hub_id'])[0].rpartition('/')
        return name if org == HUB_ORG else None
    if source == 'local-dir':
        return Path(cfg['file']).name
    if _is_file_source(cfg):
        return Path(cfg['file']).parent.name
    if _hub_source(cfg) and cfg.get('tag'):
        return f"{cfg['architecture']}.{cfg['tag']}"
    return None


def _from_hf_cache(repo_id: str, filename: str, revision: Optional[str],
                   cache_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def weights_path(cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The file timm reads the weights from for this cfg, if it is on disk (None for an in-memory state dict)."""
    if cfg.get('source') == 'local-dir':
        path = Path(cfg['file']) / WEIGHTS_FILE
        return path if path.is_file() else None
    if _is_file_source(cfg):
        return Path(cfg['file'])
    hub = _hub_source(cfg)
    if hub is None:
        return None
    repo_id, revision = hub
    return _from_hf_cache(repo_id, cfg.get('hf_hub_filename') or WEIGHTS_FILE, revision, cache_dir)


def _config_path(cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The config.json timm built this cfg from: a ``local-dir:`` folder's, or an ``hf-hub:`` repo's (HF cache)."""
    if cfg.get('source') == 'local-dir':
        return Path(cfg['file']) / 'config.json'
    if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        repo_id, revision = hf_split(cfg['hf_hub_id'])
        return _from_hf_cache(repo_id, 'config.json', revision, cache_dir)
    return None


def folder_sha256(config_path: Union[str, Path]) -> Optional[str]:
    """The sha256 a checkpoint folder's config.json records for its weights (``CONFIG_SHA256_KEY``), if any."""
    try:
        return json.loads(Path(config_path).read_text()).get(CONFIG_SHA256_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def verify_checksum(cfg: Dict[str, Any], path: Optional[Path], cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Compare the weights file with each sha256 recorded for it: ``PUBLISHED`` for its checkpoint name, and the
    ``weights_sha256`` of the config.json it came with (``local-dir:``, ``hf-hub:``)."""
    name = checkpoint_name(cfg)
    expected = []  # (sha256, who recorded it)
    if name in PUBLISHED:
        sha256 = PUBLISHED[name].sha256
        expected.append((sha256, f'timm_denseres recorded {sha256} for the published {name}'))
    config_path = _config_path(cfg, cache_dir)
    sha256 = folder_sha256(config_path) if config_path else None
    if sha256:
        expected.append((sha256, f'its {config_path} records {sha256}'))
    if not expected:
        return
    what = name or cfg.get('architecture')
    if path is None:
        raise PretrainedWeightsError(
            f'Cannot verify the weights of {what}: the {WEIGHTS_FILE} that timm read was not found on disk '
            f'(cfg source: {cfg.get("source") or "tag"}, hf_hub_id: {cfg.get("hf_hub_id")}).')
    actual = sha256_file(path)
    for sha256, recorded in expected:
        if actual != sha256:
            raise PretrainedWeightsError(
                f'Checksum mismatch for {what}: {path} has sha256 {actual}, but {recorded}. The file is corrupt or '
                f'is not the checkpoint it is named as. Delete it (for the Hugging Face cache: `hf cache delete`, '
                f'or remove the repo folder from {hf_constants.HF_HUB_CACHE}) and load again; if a published Hub '
                f'repo was updated on purpose, upgrade timm_denseres.')


# ---------------------------------------------------------------------------------------------------------------
# Turning a checkpoint into the model's state dict, and checking it fits


def _is_gate_key(key: str) -> bool:
    return '.gate.' in f'.{key}'


def warm_start_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        gate_logit: float = WARM_START_GATE_LOGIT,
) -> Dict[str, torch.Tensor]:
    """A dense model's state dict from its base network's (e.g. timm's ``resnet34``): shared weights as they are,
    every gate at identity (``model.set_gates_identity(gate_logit)``). The model's gates are set as a side effect.

    Only the gates may be missing from ``state_dict``; anything else that does not fit is left for
    :func:`check_state_dict_fits` to report.
    """
    model.set_gates_identity(gate_logit)
    out = dict(state_dict)
    for key, value in model.state_dict().items():
        if _is_gate_key(key) and key not in out:
            out[key] = value.detach().clone()
    return out


def _to_rgb_first_conv(state_dict: Dict[str, torch.Tensor], model: nn.Module, cfg: Dict[str, Any]) -> None:
    """Give a first conv that is neither 3-channel nor the model's width timm's 3-channel form.

    After the filter, timm adapts the first conv from 3 channels to ``in_chans`` (sum for 1, repeat and scale
    otherwise), assuming RGB weights. A grayscale checkpoint (Fashion-MNIST) is therefore spread over 3
    channels first (each 1/3 of the gray kernel): a 3-channel model then answers a gray image replicated over
    RGB exactly as the 1-channel one does, and timm's own step maps it to any other width.
    """
    first_conv = cfg.get('first_conv')
    key = f'{first_conv}.weight' if isinstance(first_conv, str) else None
    weight = state_dict.get(key) if key else None
    target = model.state_dict().get(key) if key else None
    if weight is None or target is None or weight.ndim != 4:
        return
    ckpt_chans, model_chans = weight.shape[1], target.shape[1]
    if ckpt_chans != 3 and ckpt_chans != model_chans:
        gray = weight.float().sum(dim=1, keepdim=True)
        state_dict[key] = (gray.repeat(1, 3, 1, 1) / 3).to(weight.dtype)


def _show(keys: Sequence[str], sep: str = ', ') -> str:
    shown = sep.join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f', ... ({len(keys) - _MAX_KEYS_SHOWN} more)' if len(keys) > _MAX_KEYS_SHOWN else '')


def check_state_dict_fits(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        cfg: Dict[str, Any],
        where: str,
) -> None:
    """Refuse a checkpoint for another architecture or class count, naming the keys that differ.

    What timm adapts after the filter is allowed: the classifier when the model's ``num_classes`` differs from
    the cfg's (timm drops it), and the input-channel size of the first conv.
    """
    model_state = model.state_dict()
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    classifier_keys = {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')}
    dropped = classifier_keys if getattr(model, 'num_classes', None) != cfg.get('num_classes') else set()
    first_conv = cfg.get('first_conv')
    first_conv_key = f'{first_conv}.weight' if isinstance(first_conv, str) else None

    # BatchNorm fills a missing num_batches_tracked itself
    missing = [k for k in model_state if k not in state_dict and k not in dropped
               and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in model_state and k not in dropped]
    mismatched, mismatched_keys = [], []
    for key, target in model_state.items():  # the model's order: blocks in sequence
        value = state_dict.get(key)
        if value is None or key in dropped:
            continue
        want = target.shape
        if value.shape == want:
            continue
        if key == first_conv_key and value.ndim == 4 and value.shape[:1] + value.shape[2:] == want[:1] + want[2:]:
            continue  # only the input channels differ: timm adapts those
        mismatched.append(f'{key}: checkpoint {tuple(value.shape)}, model {tuple(want)}')
        mismatched_keys.append(key)
    if not (missing or unexpected or mismatched):
        return

    arch = cfg.get('architecture', type(model).__name__)
    in_chans = model_state[first_conv_key].shape[1] if first_conv_key in model_state else '?'
    lines = [f'The weights in {where} do not fit {arch} '
             f'(num_classes={getattr(model, "num_classes", "?")}, in_chans={in_chans}):']
    if missing:
        lines.append(f'  {len(missing)} keys of the model are missing from the checkpoint: {_show(missing)}')
    if unexpected:
        lines.append(f'  {len(unexpected)} keys of the checkpoint are not in the model: {_show(unexpected)}')
    if mismatched:
        lines.append(f'  {len(mismatched)} shapes differ: ' + _show(mismatched, sep='; '))
    if missing and all(_is_gate_key(k) for k in missing) and not unexpected:
        lines.append('  The checkpoint has no Gate-Module weights: it is the plain network. Load it into the plain '
                     'model, or start the dense one from it with a *_warm tag or '
                     'timm_denseres.pretrained.warm_start_state_dict().')
    if unexpected and all(_is_gate_key(k) for k in unexpected):
        lines.append('  The checkpoint has gates the model lacks: it is a dense checkpoint for a plain model.')
    if mismatched_keys and all(_is_gate_key(k) for k in mismatched_keys) and not (missing or unexpected):
        lines.append('  Only Gate-Module widths differ: the checkpoint is for another N (dense_n).')
    ckpt_fc = [state_dict[k] for k in sorted(classifier_keys - dropped) if k in state_dict and k.endswith('weight')]
    if ckpt_fc and ckpt_fc[0].ndim >= 1 and ckpt_fc[0].shape[0] != cfg.get('num_classes'):
        lines.append(f'  Its classifier has {ckpt_fc[0].shape[0]} classes but its config says '
                     f'{cfg.get("num_classes")}: the config.json and the weights are from different models.')
    raise PretrainedWeightsError('\n'.join(lines))


class LoadChecks:
    """timm ``pretrained_filter_fn``: checksum, warm start, first-conv channels, fit check, in that order.

    timm calls it as ``filter_fn(state_dict, model)`` after reading the weights and before its own
    classifier / first-conv adaptation and ``load_state_dict``.
    """

    def __init__(
            self,
            cache_dir: Optional[Union[str, Path]] = None,
            gate_logit: Optional[float] = None,
    ):
        self.cache_dir = cache_dir
        self.gate_logit = WARM_START_GATE_LOGIT if gate_logit is None else float(gate_logit)

    def __call__(self, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        cfg = model.pretrained_cfg
        path = weights_path(cfg, self.cache_dir)
        verify_checksum(cfg, path, self.cache_dir)
        name = f"{cfg.get('architecture')}.{cfg.get('tag')}"
        if name in WARM_STARTS and not any(_is_gate_key(k) for k in state_dict):
            # the base network's weights: the dense model keeps timm's parameter names, so only the gates are new
            state_dict = warm_start_state_dict(state_dict, model, self.gate_logit)
        state_dict = dict(state_dict)
        _to_rgb_first_conv(state_dict, model, cfg)
        check_state_dict_fits(state_dict, model, cfg, where=str(path) if path else _describe_source(cfg))
        return state_dict


# ---------------------------------------------------------------------------------------------------------------
# The builder, and clear errors


def _describe_source(cfg: Dict[str, Any]) -> str:
    if cfg.get('source') == 'local-dir' or _is_file_source(cfg):
        return str(cfg['file'])
    if cfg.get('hf_hub_id') and cfg.get('state_dict') is None:
        return f"the Hub repo {cfg['hf_hub_id']}"
    return 'the given state dict'


def _known_tags(variant: str) -> Tuple[List[str], List[str]]:
    names = sorted(get_arch_pretrained_cfgs(variant))
    return names, [n for n in names if is_model_pretrained(n)]


def _check_tag(variant: str, tag: str) -> None:
    names, with_weights = _known_tags(variant)
    if f'{variant}.{tag}' not in names:
        raise PretrainedWeightsError(
            f"Unknown pretrained tag {tag!r} for {variant}. Checkpoints of {variant}: "
            f"{', '.join(with_weights) or 'none yet'} (timm.list_pretrained('{variant}*'); MODEL_CARD.md says "
            f"what each is and which are still to be trained).")


def bundled_folder(name: str) -> Optional[Path]:
    """The ``weights/{name}`` folder of the checkout this package runs from, if it holds that checkpoint."""
    folder = Path(__file__).resolve().parent.parent / 'weights' / name
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (``weights/...`` in the checkout)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def hub_error_message(what: str, repo_id: str, error: Exception, cache_dir: Optional[Union[str, Path]] = None,
                      warm_start: Optional[str] = None) -> str:
    """What went wrong getting ``repo_id`` from the Hub, and the ways out. ``warm_start``: the ``*_warm`` model
    asked for, whose weights are another model's file (``repo_id``'s), not a folder of its own."""
    org, _, repo_name = repo_id.rpartition('/')
    folder = bundled_folder(repo_name) if org == HUB_ORG else None
    local = f"timm.create_model('local-dir:{_shown(folder)}', pretrained=True)" if folder else None
    endpoint = hf_constants.ENDPOINT
    if isinstance(error, RepositoryNotFoundError):
        return (f'Cannot load {what}: {repo_id} does not exist on {endpoint} (or is private). If it is a '
                f'timm_denseres checkpoint, it may not be published yet: see MODEL_CARD.md.'
                + (f' This checkout has it: {local}.' if local else ''))
    if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
        return f'Cannot load {what}: the Hub repo {repo_id} has no {WEIGHTS_FILE} / config.json ({error}).'
    cache = cache_dir or hf_constants.HF_HUB_CACHE
    if hf_constants.HF_HUB_OFFLINE:
        reason = 'offline mode is on (HF_HUB_OFFLINE=1)'
    else:
        reason = f'the Hugging Face Hub ({endpoint}) could not be reached ({type(error).__name__}: {error})'
    if warm_start:  # its weights are another model's file: local-dir: would build that model
        fetch = (f'fetch the file where the Hub is reachable (`hf download {repo_id} {WEIGHTS_FILE} --local-dir DIR`), '
                 f"copy it here and load it with timm.create_model('{warm_start}', pretrained=True, "
                 f"pretrained_cfg_overlay=dict(file='DIR/{WEIGHTS_FILE}'))")
    else:
        fetch = (f'fetch the folder where the Hub is reachable (`hf download {repo_id} --local-dir DIR`), copy it '
                 f"here and load it with timm.create_model('local-dir:DIR', pretrained=True)")
    return (
        f'Cannot load {what}: {reason} and {repo_id} is not in the Hugging Face cache ({cache}). Either:\n'
        + (f'  - load the copy in this checkout, no Hub needed: {local};\n' if local else '')
        + f'  - allow the download once: be online with HF_HUB_OFFLINE unset;\n'
        f'  - use a Hub mirror you can reach: set HF_ENDPOINT=https://your-mirror;\n'
        f'  - {fetch};\n'
        f'  - or copy a Hugging Face cache that holds it to HF_HUB_CACHE and set HF_HUB_OFFLINE=1.')


def _ask_hub(repo_id: str, filename: str, revision: Optional[str], what: str,
             cache_dir: Optional[Union[str, Path]], warm_start: Optional[str] = None) -> None:
    """Raise the clear error at once when the Hub cannot give ``filename``: one request, without the retries of
    huggingface_hub's download (~23 s per file on a failed connection, and timm asks for two files)."""
    if hf_constants.HF_HUB_OFFLINE:
        raise PretrainedWeightsError(
            hub_error_message(what, repo_id, OfflineModeIsEnabled('offline'), cache_dir, warm_start))
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except RepositoryNotFoundError as e:
        raise PretrainedWeightsError(hub_error_message(what, repo_id, e, cache_dir, warm_start)) from None
    except HfHubHTTPError:
        return  # the Hub answered (a gated repo, another file name, ...): timm's own download handles it
    except Exception as e:  # huggingface_hub raises its HTTP client's own errors for a failed connection
        raise PretrainedWeightsError(hub_error_message(what, repo_id, e, cache_dir, warm_start)) from None


PAPER = dict(
    paper_ids='MIRU2020',
    paper_name='Dense Residual Networks for Image Classification (Takeda, MIRU 2020)',
    license='apache-2.0',
)
"""The paper fields of every pretrained cfg."""


def imagenet_cfg(**kwargs: Any) -> Dict[str, Any]:
    """The untagged ImageNet-1K cfg of a paper model: 224 input, the paper's test crop (short side 256, centre
    224: crop_pct 0.875), the paper's fields; ``kwargs`` add or override (first_conv, classifier, interpolation)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, **PAPER, **kwargs,
    }


@contextmanager
def _no_channel_conversion_log() -> Iterator[None]:
    """timm converts a checkpoint's first conv from 3 channels to the model's whenever the model has not 3, and logs
    it; a checkpoint that has the model's channels already (a 1-channel one into a 1-channel model) passes through
    that step unchanged (its gray kernel spread over 3 channels and summed back), so the log line would be wrong."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith('Converted input conv')

    log = logging.getLogger('timm.models._builder')
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


GATE_SCALE_BEFORE_THE_LEVER = 1.0  # what every checkpoint made before gate_logit_scale existed was trained with


def recorded_gate_scale(cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]] = None) -> Optional[float]:
    """The gate_logit_scale the weights of a pretrained cfg were trained with: a checkpoint folder's config.json
    (model_args) or the PUBLISHED line of a tag; None for weights without gates (warm starts, timm's)."""
    name = checkpoint_name(cfg)
    if name in WARM_STARTS:
        return None
    config_path = _config_path(cfg, cache_dir)
    if config_path is not None and config_path.is_file():
        model_args = json.loads(config_path.read_text()).get('model_args') or {}
        return float(model_args.get('gate_logit_scale', GATE_SCALE_BEFORE_THE_LEVER))
    return PUBLISHED[name].gate_logit_scale if name in PUBLISHED else None


def with_dense_defaults(name: str, cfg: Dict[str, Any], pretrained: bool, kwargs: Dict[str, Any],
                        defaults: Dict[str, Any], named_checkpoint: bool = False) -> Dict[str, Any]:
    """A dense model's keyword arguments: ``defaults`` where not given, and the gate logit scale a checkpoint was
    trained with: with its weights (a different one asked for explicitly is refused: the weights would mean other
    gates), and without them where the model is named after the checkpoint (``named_checkpoint``: a tag,
    ``local-dir:`` or ``hf-hub:``), as timm's scripts build a run fine-tuned from it to load the run's own weights."""
    recorded = recorded_gate_scale(cfg, kwargs.get('cache_dir')) if pretrained or named_checkpoint else None
    if recorded is not None and pretrained:
        asked = kwargs.get('gate_logit_scale', recorded)
        if float(asked) != recorded:
            raise ValueError(f'the pretrained weights of {name} were trained with gate_logit_scale={recorded:g}; '
                             f'gate_logit_scale={asked:g} would change what they compute. Leave it out.')
        kwargs = dict(kwargs, gate_logit_scale=recorded)
    elif recorded is not None:
        kwargs = dict(dict(gate_logit_scale=recorded), **kwargs)
    return dict(defaults, **kwargs)


def build_model_with_pretrained(
        model_cls: Union[Type[nn.Module], Callable[..., nn.Module]],
        variant: str,
        pretrained: bool = False,
        feature_levels: Optional[int] = None,
        dense_defaults: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with checked pretrained loading (see the module docstring).

    Args:
        model_cls, variant, pretrained, **kwargs: as for ``build_model_with_cfg`` (``pretrained_cfg``,
            ``pretrained_cfg_overlay``, ``cache_dir``, ``feature_cfg``, model kwargs).
        feature_levels: the model's feature_info length: ``features_only`` then wraps ``forward_intermediates``
            (timm's 'getter') and takes every level by default.
        dense_defaults: a dense model's defaults for the gates (:func:`with_dense_defaults`); None for a model
            without gates.

    Keyword Args:
        gate_logit (float): gate logit of a warm start (default ``WARM_START_GATE_LOGIT``); only with a
            ``*_warm`` tag and ``pretrained=True``.
    """
    gate_logit = kwargs.pop('gate_logit', None)
    if feature_levels is not None:
        kwargs.setdefault('feature_cfg', dict(feature_cls='getter', out_indices=tuple(range(feature_levels))))
    cfg_arg = kwargs.get('pretrained_cfg')
    if isinstance(cfg_arg, str):
        _check_tag(variant, cfg_arg)
    overlay = kwargs.get('pretrained_cfg_overlay')
    cfg = resolve_pretrained_cfg(variant, cfg_arg, dict(overlay) if overlay else None).to_dict()
    name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
    if gate_logit is not None and not (pretrained and name in WARM_STARTS):
        raise ValueError(f'gate_logit is for warm-start tags with pretrained=True ({", ".join(WARM_STARTS)}); '
                         f'{name} with pretrained={pretrained} has no gates to set.')
    if dense_defaults is not None:
        named = isinstance(cfg_arg, str) or cfg.get('source') in ('local-dir', 'hf-hub')
        kwargs = with_dense_defaults(name, cfg, pretrained, kwargs, dense_defaults, named_checkpoint=named)
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)

    if not (cfg.get('url') or cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('state_dict') is not None):
        _, with_weights = _known_tags(variant)
        raise PretrainedWeightsError(
            f"{name} has no pretrained weights. Checkpoints of {variant}: {', '.join(with_weights) or 'none yet'} "
            f"(e.g. timm.create_model('{with_weights[0] if with_weights else variant + '.TAG'}', pretrained=True)); "
            f'MODEL_CARD.md lists the paper checkpoints that do not exist yet and how to train them.')
    if cfg.get('source') == 'local-dir' and not (Path(cfg['file']) / WEIGHTS_FILE).is_file():
        raise PretrainedWeightsError(f"{cfg['file']} has no {WEIGHTS_FILE}: not a checkpoint folder "
                                     f"({', '.join(HUB_FILES)}).")

    cache_dir = kwargs.get('cache_dir')
    hub = _hub_source(cfg)
    if hub and weights_path(cfg, cache_dir) is None:
        repo_id, revision = hub
        _ask_hub(repo_id, cfg.get('hf_hub_filename') or WEIGHTS_FILE, revision, f'the weights of {name}', cache_dir,
                 warm_start=name if name in WARM_STARTS else None)
    checks = LoadChecks(cache_dir=cache_dir, gate_logit=gate_logit)
    cfg_chans = cfg.get('input_size', (3,))[0]
    same_chans = kwargs.get('in_chans', cfg_chans) == cfg_chans != 3  # timm's default in_chans is the cfg's
    try:
        with _no_channel_conversion_log() if same_chans else nullcontext():
            return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checks, **kwargs)
    except SafetensorError as e:
        path = weights_path(cfg, cache_dir)
        raise PretrainedWeightsError(
            f'The weights file of {name} ({path or _describe_source(cfg)}) is not a valid safetensors file: '
            f'{e}. It is truncated or corrupt (an interrupted download or copy). Delete it and load again '
            f'(for the Hugging Face cache: `hf cache delete`).') from None
    except _HUB_ERRORS as e:
        repo_id = hf_split(cfg.get('hf_hub_id') or '?')[0]
        raise PretrainedWeightsError(hub_error_message(f'the weights of {name}', repo_id, e, cache_dir,
                                                       name if name in WARM_STARTS else None)) from None


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with the clear Hub error also for ``hf-hub:`` names.

    For ``hf-hub:`` names timm fetches ``config.json`` before any DenseResNet code runs; when that fails this
    raises :class:`PretrainedWeightsError` (with what to do) instead of huggingface_hub's error, and at once
    instead of after huggingface_hub's retries.
    """
    source, model_id = parse_model_name(model_name)
    if source == 'hf-hub':
        repo_id, revision = hf_split(model_id)
        if _from_hf_cache(repo_id, 'config.json', revision, kwargs.get('cache_dir')) is None:
            _ask_hub(repo_id, 'config.json', revision, f'the config of {model_name}', kwargs.get('cache_dir'))
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except _HUB_ERRORS as e:
        repo_id = hf_split(model_name.split(':', 1)[-1])[0]
        raise PretrainedWeightsError(
            hub_error_message(f'the config of {model_name}', repo_id, e, kwargs.get('cache_dir'))) from None
