"""The chapters' shared set-up: device, seeds, threads, plotting defaults (``moe_lib[book]``)."""

from __future__ import annotations

import os

import torch

from moe_lib.checks import check_int
from moe_lib.runtime import default_device, import_extra, seed_everything

plt = import_extra("matplotlib.pyplot", "book")
sns = import_extra("seaborn", "book")

THREADS_ENV = "MOE_BOOK_THREADS"
QUICK_ENV = "MOE_BOOK_QUICK"


def setup(seed: int = 0) -> tuple[torch.device, bool]:
    """Seed everything, pick the device, and say whether to use full (GPU) sizes.

    Returns ``(device, full)``: ``device`` is CUDA when present, else CPU; ``full`` is True on
    CUDA (chapters scale their sizes up) unless the environment sets ``MOE_BOOK_QUICK=1``.
    On a CPU, PyTorch gets ``MOE_BOOK_THREADS`` threads (default 1): the chapters' models are
    small, and extra intra-op threads only add overhead (10x and more on a busy machine).
    """
    check_int("seed", seed, low=0, high=2**32 - 1)

    seed_everything(seed)
    device = default_device()
    full = device.type == "cuda" and not os.environ.get(QUICK_ENV)
    if device.type == "cpu":
        threads = os.environ.get(THREADS_ENV, "1")
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"{THREADS_ENV} must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(int(threads))
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams["figure.dpi"] = 90
    print(f"moe_lib set-up: device={device}, full sizes={full}, seed={seed}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    return device, full
