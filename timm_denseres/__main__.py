"""`python -m timm_denseres`: the main job on the embedded default (see README)."""
import argparse

from . import model_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    print('Model table (measured live; MACs counted by torch.utils.flop_counter, see timm_denseres/flops.py):')
    print(model_table.format_table(model_table.measure_models()))


if __name__ == '__main__':
    main()
