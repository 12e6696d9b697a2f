"""Where and how the code runs: seeds, CPU threads, device synchronisation, optional extras.

Imports nothing from moe_lib, so every other module (the training loop, the benchmarks, the
chapters' set-up) can use it.
"""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch

from moe_lib.checks import check_int, check_type


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and every CUDA device)."""
    check_int("seed", seed, low=0, high=2**32 - 1)  # NumPy's legacy seeding takes uint32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when a GPU is visible to torch, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_device(device: torch.device | str, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; a ValueError naming the argument for an unknown one."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda', "
                        f"got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{name} must name a device such as 'cpu', 'cuda' or 'cuda:0', got "
                         f"{device!r}") from err


def available_device(device: torch.device | str, name: str = "device") -> torch.device:
    """:func:`as_device`, and a ValueError naming the argument when it is a CUDA device and
    torch sees no GPU (before any work, not at the first tensor moved there)."""
    device = as_device(device, name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} must be available: {device} needs a CUDA GPU and none is "
                         "visible to torch")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels to finish (a no-op on a CPU): call before a clock."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (None: leave as is), then restore the count."""
    if n is not None:
        check_int("n", n, low=1)
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


EXTRAS = {"book": ("matplotlib", "seaborn", "pandas", "ipywidgets", "tqdm")}


def import_extra(module: str, extra: str) -> ModuleType:
    """Import ``module``, an optional dependency of moe_lib, or say which extra installs it.

    The core of moe_lib (layers, routers, losses, kernels) needs torch and numpy only; plotting,
    sliders and the training loop's history need ``pip install "moe_lib[book]"``.
    """
    check_type("module", module, str)
    check_type("extra", extra, str)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is needed here but is not installed; it comes with moe_lib's "
            f"'{extra}' extra: pip install \"moe_lib[{extra}]\""
        ) from err
