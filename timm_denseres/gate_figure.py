"""The paper's Fig. 4: mean mixing weight ``w_ik`` per block i and offset i-k, drawn as a heat map."""
import textwrap
from typing import Dict, List, Optional

__all__ = ['plot_gate_weights', 'matplotlib_installed', 'MATPLOTLIB_HINT']

# matplotlib is optional (not a dependency): only the figures need it
MATPLOTLIB_HINT = 'matplotlib is not installed (pip install matplotlib, or pip install -e ".[extras]")'


def matplotlib_installed() -> bool:
    """Whether matplotlib can be imported; a matplotlib that is there but broken still raises."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != 'matplotlib':
            raise
        return False
    return True


def plot_gate_weights(w_mean: Dict[str, List[float]], path: str, title: Optional[str] = None) -> None:
    """Write a PNG: one row per block (forward order), one column per offset (1 = the shortcut)."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = list(w_mean)
    offsets = max(len(w) for w in w_mean.values())
    grid = np.full((len(blocks), offsets), np.nan)
    for row, block in enumerate(blocks):
        grid[row, :len(w_mean[block])] = w_mean[block]

    height, width = max(4.0, 0.12 * len(blocks) + 1.5), 1.0 + 0.9 * offsets
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(grid, aspect='auto', cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
    ax.set_xticks(range(offsets), [str(k + 1) for k in range(offsets)])
    ax.set_xlabel('offset i - k  (1 = shortcut of the previous block)')
    step = max(1, len(blocks) // 18)
    ax.set_yticks(range(0, len(blocks), step), [f'{i + 1} ({blocks[i]})' for i in range(0, len(blocks), step)],
                  fontsize=7)
    ax.set_ylabel('block i')
    # a run's name can be wider than a narrow heat map: wrap to about 10 characters of 9-point text per inch
    ax.set_title(textwrap.fill(title or 'mean mixing weight w_ik', int(10 * width)), fontsize=9)
    fig.colorbar(image, ax=ax, label='mean w_ik')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
