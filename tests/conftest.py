"""Shared test set-up: one torch thread per xdist worker, so `pytest -n 2` uses the two cores without
oversubscribing them."""
import os

import torch

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)
