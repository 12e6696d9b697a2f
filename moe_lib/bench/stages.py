"""Where the forward time of the sorted dispatch goes, stage by stage, next to the dense bound.

For ``x: [T, d]`` and an ``MoE(d, h, E, k)`` with the sorted dispatch, the stages are:

- router: ``x -> Routing`` (a ``d x E`` matmul, softmax, top-k: ``2 T d E`` FLOPs);
- sort: :meth:`moe_lib.permute.Permutation.from_routing` (argsort, inverse, counts);
- permute: ``xs = x[src]: [T k, d]``;
- experts: the expert FFNs on their contiguous slices (``2 T k 3 d h`` FLOPs);
- combine: ``y[t] = sum_j w[t, j] * out[pos[t, j]]``;

and ``dense bound``: ``FeedForward(d, k*h)`` on the same ``x`` (``2 T 3 d k h`` FLOPs).
"""

from __future__ import annotations

import statistics

import torch

from moe_lib.bench.impls import check_dtype, check_size
from moe_lib.bench.timing import get_clock
from moe_lib.checks import check_int, check_positive_int
from moe_lib.experts import FeedForward
from moe_lib.layer import MoE
from moe_lib.permute import Permutation, permute, unpermute_combine
from moe_lib.runtime import as_device, cpu_threads, synchronize

STAGES = ("router", "sort", "permute", "experts", "combine", "dense bound")


def stage_times(d: int, h: int, E: int, k: int, T: int, rounds: int = 7,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                clock: str = "wall", threads: int | None = None) -> dict[str, float]:
    """Median milliseconds of each stage in :data:`STAGES`, forward only (``x`` requires
    gradients, so autograd records the graph as in training; nothing is differentiated).

    ``rounds`` timed rounds after one warm-up round; ``threads``: CPU threads while timing
    (None: as set); ``clock``: "wall" or "process" (a CPU with one thread).
    """
    check_size("", d, h, E, k)
    check_positive_int("T", T)
    check_positive_int("rounds", rounds)
    device = as_device(device)
    check_dtype("dtype", dtype)
    if threads is not None:
        check_int("threads", threads, low=1)
    with cpu_threads(threads if device.type == "cpu" else None):
        now = get_clock(clock, device)
        return _stage_times(d, h, E, k, T, rounds, device, dtype, now)


def _stage_times(d, h, E, k, T, rounds, device, dtype, now) -> dict[str, float]:
    torch.manual_seed(0)
    moe = MoE(d, h, E, k).to(device=device, dtype=dtype)
    dense = FeedForward(d, k * h).to(device=device, dtype=dtype)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    samples: dict[str, list[float]] = {}
    for r in range(rounds + 1):
        marks = [now()]
        routing = moe.router(x)
        synchronize(device)
        marks.append(now())
        perm = Permutation.from_routing(routing)
        synchronize(device)
        marks.append(now())
        xs = permute(x, perm)
        synchronize(device)
        marks.append(now())
        out = moe.experts.forward_slices(xs, perm.counts)
        synchronize(device)
        marks.append(now())
        unpermute_combine(out, routing.weights.to(dtype), perm)
        synchronize(device)
        marks.append(now())
        dense(x)
        synchronize(device)
        marks.append(now())
        if r:  # round 0 warms up
            for name, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True):
                samples.setdefault(name, []).append(1e3 * (b - a))
    return {name: statistics.median(v) for name, v in samples.items()}
