"""timm's own inference.py with the DenseResNet models registered; every flag goes to it unchanged.

    python scripts/inference.py data/sample/fashion-mnist --model local-dir:weights/denseresnet20_n4.fmnist

It writes each image's top classes (with a checkpoint's label names) to NAME-SIZE.csv and prints them. Flags the
script's defaults get wrong here are added unless given (--device cpu without CUDA, --in-chans of a 1-channel
checkpoint, --results-file for a local-dir:/hf-hub: model), and a 1-channel model's images are read in mode L:
see timm_denseres/timm_scripts.py, which also says where inference.py comes from (--timm-repo / TIMM_REPO /
download cache). It needs pandas.
"""
from timm_denseres.timm_scripts import inference_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    inference_main()
