"""Timing and memory of training steps: interleaved rounds, medians, exact peak memory.

A training step of an implementation ``f`` is ``y = f(x)`` (autograd recording, as in
training) and ``y.backward(g)``, with ``x.requires_grad`` so that the input gradient is part of
the work, as in a network.

Timing (:func:`time_impls`). Each implementation is warmed up (untimed calls), then, round after
round, every implementation runs one step: "fwd" is the time of ``f(x)``, "fwdbwd" of
``f(x)`` and ``backward`` together. The order rotates from round to round and the results are
medians, so a burst of load from other processes hits all implementations alike. The slow ones
stop after ``min_rounds`` rounds once a time budget is spent.

Clocks (:func:`get_clock`): "wall" is ``time.perf_counter``; "process" is
``time.process_time``, the CPU seconds of this process. With one CPU thread the process clock
measures the work done and not the time spent waiting for a core, which is what to use on a
machine shared with other jobs.

Peak memory (:func:`peak_memory`). torch's CPU allocations are invisible to tracemalloc, and the
resident set size depends on malloc's caching. Instead, one step (gradients set to None,
forward, backward) runs under ``torch.profiler`` with ``profile_memory=True``: the profiler
records every allocation and free of torch's CPU allocator with its size, and the running sum
of these sizes in time order is the memory held by tensors created during the step; its maximum
is the peak above the level before the step (parameters and inputs excluded; activations,
temporaries and the newly allocated parameter and input gradients included). The count is exact
and does not depend on the load. On CUDA, ``torch.cuda.max_memory_allocated`` gives the same
quantity.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive_int,
    check_tensor,
    check_type,
)
from moe_lib.runtime import as_device, synchronize

CLOCKS = ("wall", "process")

StepFn = Callable[[Tensor], Tensor]


@dataclass
class Impl:
    """One implementation under test: ``fn: x [T, d] -> y [T, d]`` and the parameters whose
    gradients a step sets to None first; ``fn`` is None when it cannot run here (``note``
    says why)."""

    name: str
    fn: StepFn | None
    params: list[torch.nn.Parameter]
    note: str = ""

    def __post_init__(self) -> None:
        check_type("name", self.name, str)
        if self.fn is not None and not callable(self.fn):
            raise TypeError(f"fn must be callable, x -> y, or None, got {type(self.fn).__name__}")
        check_type("params", self.params, list)
        for i, p in enumerate(self.params):
            check_tensor(f"params[{i}]", p)
        check_type("note", self.note, str)


def get_clock(kind: str, device: torch.device | str) -> Callable[[], float]:
    """``time.perf_counter`` ("wall") or ``time.process_time`` ("process": a CPU with one
    intra-op thread only, checked now: with more threads it would add up their CPU time)."""
    check_choice("clock", kind, CLOCKS)
    device = as_device(device)
    if kind == "wall":
        return time.perf_counter
    if device.type != "cpu" or torch.get_num_threads() != 1:
        raise ValueError(f"clock='process' measures work only on a CPU with one thread; got "
                         f"device={device.type!r} with {torch.get_num_threads()} threads")
    return time.process_time


def _check_step_args(fn: object, params: object, x: object, g: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, x -> y, got {type(fn).__name__}")
    check_type("params", params, (list, tuple))
    check_tensor("x", x, dims=2, kind="float")
    check_tensor("g", g, kind="float", shape=tuple(x.shape), device=x.device)
    if not x.requires_grad:
        raise ValueError("x must require gradients: the input gradient is part of a step")


def _clear_grads(params: list[Tensor], x: Tensor) -> None:
    for p in params:
        p.grad = None
    x.grad = None


def train_step(fn: StepFn, params: list[Tensor], x: Tensor, g: Tensor) -> None:
    """One untimed step: gradients set to None, ``fn(x).backward(g)``."""
    _check_step_args(fn, params, x, g)
    _clear_grads(params, x)
    fn(x).backward(g)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ start/stop lines are written straight to it."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_memory(fn: StepFn, params: list[Tensor], x: Tensor, g: Tensor) -> int:
    """Peak bytes held by tensors created during one training step (see the module docstring)."""
    _check_step_args(fn, params, x, g)
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(fn, params, x, g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    _clear_grads(params, x)  # free the old gradients before the profiler starts: not the step's
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x).backward(g)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, running)
    return peak


def time_impls(
    impls: Mapping[str, Impl],
    x: Tensor,
    g: Tensor,
    rounds: int = 5,
    min_rounds: int = 3,
    budget_s: float = 60.0,
    slow: Collection[str] = (),
    progress: bool = False,
    clock: str = "wall",
    warmup: int = 2,
    warmed: Collection[str] = frozenset(),
) -> dict[str, dict[str, float]]:
    """Median forward and forward+backward seconds of each implementation, interleaved.

    ``warmup`` untimed calls each (one less for the ``warmed`` ones, at most one for the
    ``slow`` ones), then ``rounds`` rounds in rotating order. After ``min_rounds`` rounds the
    slow ones stop once ``budget_s`` seconds have passed. Implementations whose ``fn`` is None
    are left out. Returns ``{name: {"fwd": s, "fwdbwd": s, "rounds": n}}``.
    """
    check_type("impls", impls, Mapping)
    for name, impl in impls.items():
        check_type(f"impls[{name!r}]", impl, Impl)
    check_tensor("x", x, dims=2, kind="float")
    check_tensor("g", g, kind="float", shape=tuple(x.shape), device=x.device)
    if not x.requires_grad:
        raise ValueError("x must require gradients: the input gradient is part of a step")
    check_positive_int("rounds", rounds)
    check_int("min_rounds", min_rounds, low=1)
    check_nonnegative("budget_s", budget_s)
    for arg, names in (("slow", slow), ("warmed", warmed)):
        if isinstance(names, str) or not isinstance(names, Collection):
            raise TypeError(f"{arg} must be a collection of implementation names, got "
                            f"{type(names).__name__}")
    check_bool("progress", progress)
    check_int("warmup", warmup, low=0)
    now = get_clock(clock, x.device)

    names = [n for n, impl in impls.items() if impl.fn is not None]
    device = x.device
    for n in names:  # the warm-up also lets the allocator reach its steady state
        calls = min(warmup, 1) if n in slow else warmup
        for _ in range(calls - (n in warmed)):
            train_step(impls[n].fn, impls[n].params, x, g)
    synchronize(device)
    fwd: dict[str, list[float]] = {n: [] for n in names}
    both: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        over = r >= min_rounds and time.perf_counter() - start > budget_s
        active = [n for n in names if not (over and n in slow)]
        order = active[r % len(active):] + active[: r % len(active)] if active else []
        for n in order:
            impl = impls[n]
            _clear_grads(impl.params, x)
            synchronize(device)
            t0 = now()
            y = impl.fn(x)
            synchronize(device)
            t1 = now()
            y.backward(g)
            synchronize(device)
            t2 = now()
            fwd[n].append(t1 - t0)
            both[n].append(t2 - t0)
            del y
        if progress:
            print(f"  round {r + 1}/{rounds}: {time.perf_counter() - start:.0f} s", flush=True)
    return {n: {"fwd": statistics.median(fwd[n]), "fwdbwd": statistics.median(both[n]),
                "rounds": len(fwd[n])} for n in names}


def load_average() -> float:
    """The 1-minute load average of the machine, rounded to 0.01 (NaN where unavailable)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not available on this platform
        return float("nan")
