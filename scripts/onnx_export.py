"""timm's own onnx_export.py with the DenseResNet models registered; every flag goes to it unchanged.

    python scripts/onnx_export.py output/denseresnet20_n4.onnx --model local-dir:weights/denseresnet20_n4.fmnist

It writes OUTPUT.onnx and OUTPUT.onnx.data (the weights). A checkpoint's input size and channels are used (as
--input-size unless given), and the file's metadata gets its data config and labels, which scripts/onnx_validate.py
reads. The exporter is torch.onnx.export's default on the pinned torch, the torch.export-based one; --dynamo, which
calls a function torch 2.9 removed, is left out. Needs onnx, onnxruntime and onnxscript (pip install -e ".[onnx]").
See timm_denseres/timm_scripts.py, which also says where onnx_export.py comes from (--timm-repo / TIMM_REPO /
download cache).
"""
from timm_denseres.timm_scripts import onnx_export_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    onnx_export_main()
