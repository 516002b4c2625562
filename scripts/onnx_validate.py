"""timm's own onnx_validate.py: the accuracy of an ONNX model in onnxruntime; every flag goes to it unchanged.

    python scripts/onnx_validate.py data/sample/fashion-mnist/validation --onnx-input output/denseresnet20_n4.onnx

The data config (input size, channels, mean/std, crop, interpolation) comes from the file's metadata, written by
scripts/onnx_export.py, unless given as flags; a 1-channel model's images are read in mode L. See
timm_denseres/timm_scripts.py, which also says where onnx_validate.py comes from (--timm-repo / TIMM_REPO /
download cache).
"""
from timm_denseres.timm_scripts import onnx_validate_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    onnx_validate_main()
