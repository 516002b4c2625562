"""ONNX export of the plugin's models the way scripts/onnx_export.py runs it: timm's own ``onnx_export`` (its
``torch.onnx.export`` call: the torch.export-based exporter with the pinned timm and torch, the TorchScript one
with timm 1.0.31) under the launcher's fixes.
onnxruntime's logits must equal PyTorch's. Needs no timm scripts; tests/test_timm_scripts.py runs the script."""
import json
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import timm.utils.onnx
import torch

from helpers import make_input, model_family, plugin_model_names, randomise
from timm_denseres import timm_scripts

# each family's tiny test model (tests/test_contract.py): every model of a family runs the same code
ONNX_MODELS = {'test_denseresnet': (1, 32, 32), 'test_densemobilenetv2': (3, 64, 64)}
TOLERANCE = 1e-4


def test_every_family_has_an_onnx_model() -> None:
    assert {model_family(n) for n in ONNX_MODELS} == {model_family(n) for n in plugin_model_names()}


def _export(model: torch.nn.Module, path, input_size) -> list:
    """As onnx_export.py calls it: batch 1, the input size as argparse gives it (a list). Returns the warnings
    that reach the user."""
    with timm_scripts.onnx_export_fixes(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        warnings.filterwarnings('ignore', category=DeprecationWarning)  # not shown outside __main__
        timm.utils.onnx.onnx_export(model, str(path), input_size=input_size, batch_size=1)
    return [f'{w.category.__name__}: {w.message}' for w in caught]


def _check_logits(path, model: torch.nn.Module, chans: int, height: int) -> None:
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = make_input(3, height, chans, seed=2)  # another batch size than the export's: the batch axis is dynamic
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == expected.shape == (3, model.num_classes)
    assert np.abs(logits - expected).max() < TOLERANCE
    assert expected.std(0).max() > 10 * TOLERANCE  # logits that differ between images: not a trivial check


@pytest.mark.slow
@pytest.mark.parametrize('name', ONNX_MODELS)
def test_onnxruntime_logits_equal_pytorch(name: str, tmp_path) -> None:
    chans, height, width = ONNX_MODELS[name]
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, in_chans=chans, exportable=True), seed=1).eval()
    path = tmp_path / 'output' / f'{name}.onnx'  # a folder the launcher makes
    assert _export(model, path, [chans, height, width]) == []
    _check_logits(path, model, chans, height)

    cfg, read_chans = timm_scripts.read_onnx_cfg(str(path))
    assert read_chans == chans
    assert cfg['input_size'] == [chans, height, width] and cfg['num_classes'] == model.num_classes
    assert cfg['mean'] == list(model.pretrained_cfg['mean'])


@pytest.mark.slow
@pytest.mark.parametrize('name', ONNX_MODELS)
def test_the_torchscript_exporter_records_the_formula(name: str, tmp_path) -> None:
    """torch.onnx.export(dynamo=False), timm's default exporter from 1.0.31 on: the trace records the gates' PyTorch
    formula (the kernels and the CPU pooling shortcut are for eager mode), which onnxruntime runs."""
    chans, height, width = ONNX_MODELS[name]
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, in_chans=chans, exportable=True), seed=1).eval()
    path = tmp_path / f'{name}.onnx'
    with warnings.catch_warnings():  # torch's on this exporter, and the tracer's on the channel widths
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        torch.onnx.export(model, (torch.zeros(2, chans, height, width),), str(path), dynamo=False,
                          input_names=['input0'], output_names=['output0'],
                          dynamic_axes={'input0': {0: 'batch'}, 'output0': {0: 'batch'}})
    _check_logits(path, model, chans, height)


def test_export_metadata_keeps_other_props_and_external_weights(tmp_path) -> None:
    """write_onnx_cfg rewrites only the graph file: the weights stay in FILE.onnx.data and still load."""
    model = timm.create_model('test_denseresnet', in_chans=1).eval()
    path = tmp_path / 'model.onnx'
    torch.onnx.export(model, (torch.zeros(1, 1, 32, 32),), str(path), dynamo=True, verbose=False)
    proto = onnx.load(str(path), load_external_data=False)
    proto.metadata_props.add(key='other', value='kept')
    onnx.save(proto, str(path))
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=['a', 'b'])
    timm_scripts.write_onnx_cfg(str(path), model, [1, 32, 32])
    timm_scripts.write_onnx_cfg(str(path), model, [1, 32, 32])  # again: one entry, not two

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert props['other'] == 'kept'
    assert len(onnx.load(str(path), load_external_data=False).metadata_props) == 2
    cfg = json.loads(props[timm_scripts.ONNX_CFG_KEY])
    assert cfg['input_size'] == [1, 32, 32] and cfg['label_names'] == ['a', 'b']
    assert (tmp_path / 'model.onnx.data').is_file()
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = make_input(1, 32, 1)  # exported without a batch axis
    with torch.no_grad():
        assert np.abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - model(x).numpy()).max() < 1e-4


def test_read_onnx_cfg_of_a_file_without_it(tmp_path) -> None:
    assert timm_scripts.read_onnx_cfg(str(tmp_path / 'missing.onnx')) == ({}, None)
    (tmp_path / 'bad.onnx').write_text('not onnx')
    assert timm_scripts.read_onnx_cfg(str(tmp_path / 'bad.onnx')) == ({}, None)
