"""timm's own validate.py with the DenseResNet models registered; every flag goes to it unchanged.

    python scripts/validate.py data/fashion-mnist --split validation --model denseresnet110_n4 \
        --num-classes 10 --in-chans 1 --checkpoint output/train/.../model_best.pth.tar

See timm_denseres/timm_scripts.py for where validate.py comes from (--timm-repo / TIMM_REPO / download cache).
"""
from timm_denseres.timm_scripts import validate_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    validate_main()
