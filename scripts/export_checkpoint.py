"""Turn a timm training checkpoint into a checkpoint folder (config.json, model.safetensors, README.md): exactly
the files of its Hugging Face Hub repo. See timm_denseres/export.py and docs/fine_tune.md.

    python scripts/export_checkpoint.py output/train/digits/last.pth.tar --tag digits --out-dir weights
"""
from timm_denseres.export import main

if __name__ == '__main__':
    main()
