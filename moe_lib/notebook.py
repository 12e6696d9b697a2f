"""The chapters' shared set-up: device, seeds, plotting defaults."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0) -> tuple[torch.device, bool]:
    """Seed everything, pick the device, and say whether to use full (GPU) sizes.

    Returns ``(device, full)``: ``device`` is CUDA when present, else CPU; ``full`` is True on
    CUDA (chapters scale their sizes up) unless the environment sets ``MOE_BOOK_QUICK=1``.
    On a CPU, PyTorch gets ``MOE_BOOK_THREADS`` threads (default 1): the chapters' models are
    small, and extra intra-op threads only add overhead (10x and more on a busy machine).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    seed_everything(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda" and not os.environ.get("MOE_BOOK_QUICK")
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("MOE_BOOK_THREADS", "1")))
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams["figure.dpi"] = 90
    print(f"moe_lib set-up: device={device}, full sizes={full}, seed={seed}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    return device, full
