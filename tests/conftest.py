"""Shared test set-up: one torch thread per test process. Under `pytest -n 2` each of the two workers takes one
core; a serial run gets one thread too, because the tests use small inputs, where more threads cost more in
synchronisation than they gain (the contract file took 16 min with the default threads, 2.7 min with one)."""
import torch

torch.set_num_threads(1)
