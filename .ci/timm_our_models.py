"""pytest plugin for timm's own tests/test_models.py: keep only the tests of the models timm_denseres registers.

``-k NAME`` matches substrings of test ids, so ``resnet20`` would also select timm's ``resnet200`` and
``seresnet200d``; this compares each test's ``model_name`` parameter (tag removed) with our model names.
``OUR_MODELS="name ..."`` narrows the tests to those of our models (a name we do not register is an error).
"""
import os

import pytest
import timm
from timm.models import model_entrypoint

import timm_denseres  # noqa: F401  registers the models


def our_model_names() -> set:
    """Every registered model whose entrypoint lives in the timm_denseres package."""
    return {name for name in timm.list_models() if model_entrypoint(name).__module__.startswith('timm_denseres')}


def selected_model_names() -> set:
    ours = our_model_names()
    chosen = set(os.environ.get('OUR_MODELS', '').split())
    if not chosen:
        return ours
    unknown = chosen - ours
    if unknown:
        raise pytest.UsageError(f'OUR_MODELS names models timm_denseres does not register: {sorted(unknown)}')
    return chosen


def pytest_collection_modifyitems(config, items):
    ours = selected_model_names()
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        model = callspec.params.get('model_name') if callspec else None
        (keep if isinstance(model, str) and model.split('.')[0] in ours else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
