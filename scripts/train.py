"""timm's own train.py with the DenseResNet models registered; every flag goes to it unchanged.

    python scripts/train.py --config recipes/fashion_mnist.yaml
    torchrun --nproc_per_node=2 scripts/train.py --config recipes/cifar100_denseresnet110.yaml
    python scripts/train.py --timm-repo ~/pytorch-image-models --config ...   # a checkout instead of the cache
    python scripts/train.py --data-dir data/digits --model local-dir:weights/denseresnet110_n4.fmnist --pretrained ...

See timm_denseres/timm_scripts.py for where train.py comes from (--timm-repo / TIMM_REPO / download cache) and
the flags it adds when they are not given (--device cpu without CUDA, --in-chans of a 1-channel checkpoint,
--workers on a machine with fewer CPUs);
docs/fine_tune.md for fine-tuning on a dataset of your own.
"""
from timm_denseres.timm_scripts import train_main  # importing timm_denseres registers the models

if __name__ == '__main__':
    train_main()
