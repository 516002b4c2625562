"""Check a checkpoint folder and push it to the Hugging Face Hub. See timm_denseres/hub.py and docs/fine_tune.md.

    python scripts/publish.py weights/denseresnet110_n4.fmnist --dry-run      # stage and check only, no network
    python scripts/publish.py weights/denseresnet20_n4.digits --repo-id me/denseresnet20_n4.digits
"""
from timm_denseres.hub import main

if __name__ == '__main__':
    main()
