"""timm's own benchmark.py with the DenseResNet models registered; every flag goes to it unchanged.

    python scripts/benchmark.py --model local-dir:weights/denseresnet20_n4.fmnist --bench inference -b 64

A checkpoint's input size (channels included: the model is built with them) is added as --input-size unless
given, and --device cpu without CUDA: see timm_denseres/timm_scripts.py, which also says where benchmark.py comes
from (--timm-repo / TIMM_REPO / download cache). The speed of the gate itself: tools/benchmark.py, docs/speed.md.
"""
from timm_denseres.timm_scripts import benchmark_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    benchmark_main()
