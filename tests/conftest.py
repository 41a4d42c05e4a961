"""Shared test setup: no progress bars, a fixed torch thread count (2-core CI machines)."""

import os

os.environ.setdefault("WBC_NO_PROGRESS", "1")

import torch

torch.set_num_threads(1)
