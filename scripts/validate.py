"""timm's own validate.py with the DenseResNet models registered; every flag goes to it unchanged.

    python scripts/validate.py data/digits --model local-dir:runs/digits/denseresnet110_n4.digits --pretrained
    python scripts/validate.py data/digits --checkpoint runs/digits/finetune/last.pth.tar

A checkpoint folder brings its data config (config.json); a train.py checkpoint its run's (model, classes, input
size, mean/std). Flags the scripts' defaults get wrong here (--device cpu without CUDA, --in-chans of a 1-channel
checkpoint, --workers on a machine with fewer CPUs) are added unless given, and a checkpoint or data with another
class count than the model stops with the --num-classes to pass: see timm_denseres/timm_scripts.py, which also
says where validate.py comes from (--timm-repo / TIMM_REPO / download cache), and docs/fine_tune.md.
"""
from timm_denseres.timm_scripts import validate_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    validate_main()
