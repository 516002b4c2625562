"""The paper's Tables 1 and 2 (Takeda, MIRU 2020): parameters, multiply-adds and top-1 error."""
from typing import Dict, NamedTuple, Optional, Tuple

__all__ = ['PaperEntry', 'PAPER_TABLE', 'baseline_of']


class PaperEntry(NamedTuple):
    params_m: float  # millions of parameters
    macs_m: float  # millions of multiply-adds at the input size below
    top1_err: float  # percent
    input_size: Tuple[int, int, int]
    dataset: str


_IN1K, _C100 = (3, 224, 224), (3, 32, 32)

PAPER_TABLE: Dict[str, PaperEntry] = {
    'resnet34': PaperEntry(21.80, 3680, 24.99, _IN1K, 'ImageNet-1K'),
    'denseresnet34_n2': PaperEntry(22.75, 3690, 23.80, _IN1K, 'ImageNet-1K'),
    'denseresnet34_n4': PaperEntry(23.38, 3690, 23.60, _IN1K, 'ImageNet-1K'),
    'denseresnet34_n6': PaperEntry(24.00, 3700, 23.34, _IN1K, 'ImageNet-1K'),
    'denseresnet34_n8': PaperEntry(24.60, 3700, 23.43, _IN1K, 'ImageNet-1K'),
    'mobilenetv2_100': PaperEntry(3.50, 315, 27.70, _IN1K, 'ImageNet-1K'),
    'densemobilenetv2_n4': PaperEntry(4.08, 320, 26.60, _IN1K, 'ImageNet-1K'),
    'resnet110': PaperEntry(1.74, 258, 24.65, _C100, 'CIFAR-100'),
    'denseresnet110_n2': PaperEntry(2.03, 261, 23.03, _C100, 'CIFAR-100'),
    'denseresnet110_n4': PaperEntry(2.23, 263, 22.62, _C100, 'CIFAR-100'),
    'denseresnet110_n6': PaperEntry(2.43, 265, 23.29, _C100, 'CIFAR-100'),
    'denseresnet110_n8': PaperEntry(2.62, 267, 22.95, _C100, 'CIFAR-100'),
}

_FAMILY_BASELINES = (('denseresnet34', 'resnet34'), ('denseresnet110', 'resnet110'),
                     ('densemobilenetv2', 'mobilenetv2_100'), ('denseresnet20', 'resnet20'),
                     ('denseresnet56', 'resnet56'))


def baseline_of(model_name: str) -> Optional[str]:
    """The plain network a dense model is measured against (timm's resnet34 / mobilenetv2_100, our CIFAR ResNets)."""
    for prefix, baseline in _FAMILY_BASELINES:
        if model_name.startswith(prefix + '_'):
            return baseline
    return None
