"""timm-denseres: Dense Residual Networks (Takeda, MIRU 2020) as timm models.

Importing this package registers the models with timm, so ``timm.create_model('denseresnet34_n6')`` works.
"""
from .gate import DenseGate
from .denseresnet import DenseBasicBlock, DenseResNet
from .densemobilenet import DenseMobileNetV2

__version__ = '0.1.0'
