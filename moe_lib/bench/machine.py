"""What machine a result came from, in words, for the headers of tables and results files."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from moe_lib.runtime import as_device

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux; x86 "model name", Arm "Hardware" or
    "Model"), else ``platform.processor()``, else the architecture (``platform.machine()``)."""
    if not isinstance(cpuinfo, Path):
        raise TypeError(f"cpuinfo must be a pathlib.Path, got {type(cpuinfo).__name__}")
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device | str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a GPU; for a CPU its model, architecture, logical CPUs
    and torch's intra-op threads, e.g. ``"CPU: AMD EPYC (x86_64), 2 logical CPUs, 1 torch
    thread"``."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return str(device)
    threads = torch.get_num_threads()
    return (f"CPU: {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, "
            f"{threads} torch thread{'s' if threads != 1 else ''}")


def machine_record(device: torch.device | str) -> dict:
    """The fields a results file records about its machine: ``device`` (in words),
    ``cpu_count``, ``threads`` (torch's intra-op threads), ``torch`` and ``python`` versions."""
    return {"device": describe_device(device), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
