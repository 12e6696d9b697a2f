"""Dispatch benchmark: MoE layers against the dense FFN with the same active FLOPs.

An MoE layer with E SwiGLU experts of hidden h and top-k routing does the GEMM FLOPs of a dense
SwiGLU FFN of hidden k*h (``FeedForward(d, k*h, "swiglu")``, "the dense bound"), plus routing
(T*d*E) and two permutations of the activations. This script times, side by side in one process:

- ``dense bound``: the dense FFN of hidden k*h;
- ``dense gating``: ``MoE(router="dense")``, every expert on every token (E/k times the FLOPs);
- ``mask loop``: the per-expert boolean-mask loop of many tutorials (written below; slow);
- ``index_add (HF)``: the form of Hugging Face's ``MixtralSparseMoeBlock`` (one-hot expert mask,
  ``torch.where``, ``index_add_``), re-written below;
- ``moe_lib loop`` and ``moe_lib sorted``: ``MoE(dispatch="loop" | "sorted")``; on a CPU the
  sorted path runs the experts block by block (``moe_lib.fused_experts``), on a GPU with grouped
  GEMMs;
- ``sorted+grouped_mm``: the sorted path with ``torch._grouped_mm`` for the expert GEMMs and the
  activation in between (on a CPU too, where it runs but is not the library's choice);
- ``sorted+compile``: ``torch.compile`` of the sorted path (``--compile``; compiling takes minutes
  on 2 CPU cores, so it is off by default and reported as "n/a" with the reason).

Every top-k implementation shares the router and expert weights of one ``MoE``; their outputs are
checked against each other before timing.

Timing. Each implementation is warmed up (two untimed calls, one for the slow baselines, the
first of them the memory measurement below); then, round after round, every
implementation runs ``y = f(x)`` (timed: "forward", with autograd recording as in training) and
``y.backward(g)`` (timed together with the forward: "fwd+bwd"), with ``x.requires_grad`` so the
input gradient is part of the work, as in a network. The order of the implementations rotates
from round to round, and the tables report medians, so a burst of load from other processes
hits all implementations alike. Slow baselines stop after ``--min-rounds`` rounds once the time
budget is used; the others run ``--rounds`` rounds. Ratios are to the dense bound.

Peak memory. torch's CPU allocations are invisible to tracemalloc, and the resident set size
depends on malloc's caching. Instead, one step (``zero_grad(set_to_none=True)``, forward,
backward) runs under ``torch.profiler`` with ``profile_memory=True``: the profiler records every
allocation and free of torch's CPU allocator with its size, and the running sum of these sizes
in time order is the memory held by tensors created during the step; its maximum is the peak
above the level before the step (parameters and inputs excluded; activations, temporaries and
the newly allocated parameter and input gradients included). The count is exact and does not
depend on the load. On CUDA, ``torch.cuda.max_memory_allocated`` gives the same quantity.

GPU presets (``--preset mixtral``: d_model 4096, d_hidden 14336, 8 experts, k=2;
``--preset finegrained``: DeepSeekMoE-16B-like d_model 2048, d_hidden 1408, 64 experts, k=6;
both bfloat16 on CUDA) also print the achieved TFLOP/s of the expert GEMMs, 2*T*k*3*d*h per
forward (x3 with backward), against one dense GEMM with the same FLOPs.

    python bench/dispatch.py                       # the three CPU sizes of issue #4
    python bench/dispatch.py --quick               # chapter 6's run (1 thread, CPU time)
    python bench/dispatch.py --sizes 64,128,8,2,4096 --compile
    python bench/dispatch.py --device cuda --dtype bfloat16 --preset mixtral
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make moe_lib importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_lib import MoE  # noqa: E402
from moe_lib.experts import ExpertBank, FeedForward, expert_activation  # noqa: E402

TARGET_SIZES = [(512, 1024, 8, 2, 4096), (64, 128, 8, 2, 16384), (128, 256, 32, 2, 8192)]
# --quick: the run of chapter 6 (one of the issue's sizes, without the slowest baseline).
QUICK_SIZES = [(128, 256, 32, 2, 8192)]
PRESETS = {
    "mixtral": [(4096, 14336, 8, 2, 8192)],
    "finegrained": [(2048, 1408, 64, 6, 8192)],
}
IMPLS = ("dense bound", "dense gating", "mask loop", "index_add (HF)", "moe_lib loop",
         "moe_lib sorted", "sorted+grouped_mm", "sorted+compile")
SLOW = ("dense gating", "mask loop", "index_add (HF)", "moe_lib loop")
QUICK_IMPLS = ("dense bound", "mask loop", "index_add (HF)", "moe_lib loop", "moe_lib sorted",
               "sorted+grouped_mm")


# --------------------------------------------------------------------------------------------
# The baselines written as blog posts and model code write them (slow on purpose).


def _expert_list(bank: ExpertBank) -> nn.ModuleList:
    """One ``FeedForward`` per expert with the bank's weights (separate parameters, as in HF)."""
    experts = nn.ModuleList()
    for e in range(bank.num_experts):
        ffn = FeedForward(bank.d_model, bank.d_hidden, bank.kind)
        ffn.w_in.data.copy_(bank.w_in.data[e])
        ffn.w_out.data.copy_(bank.w_out.data[e])
        experts.append(ffn)
    return experts


class MaskLoopMoE(nn.Module):
    """The tutorial form: per expert, a mask of its tokens, then ``y[mask] += w * E(x[mask])``."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.gate = moe.router.gate  # shared router weights
        self.experts = _expert_list(moe.experts)
        self.k = moe.top_k

    def forward(self, x: Tensor) -> Tensor:
        probs = self.gate(x).softmax(dim=-1)  # [T, E]
        weights, ids = probs.topk(self.k, dim=-1)  # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = ids == e  # [T, k]
            mask = chosen.any(dim=-1)  # [T] tokens that picked expert e
            if not mask.any():
                continue
            w = (weights * chosen).sum(dim=-1, keepdim=True)  # [T, 1] their weight for e
            y[mask] += w[mask] * expert(x[mask])
        return y


class IndexAddMoE(nn.Module):
    """The Hugging Face Mixtral form: one-hot expert mask, ``torch.where``, ``index_add_``."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.gate = moe.router.gate
        self.experts = _expert_list(moe.experts)
        self.k = moe.top_k
        self.num_experts = moe.num_experts

    def forward(self, x: Tensor) -> Tensor:
        router_logits = self.gate(x)  # [T, E]
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.k, dim=-1)  # [T, k]
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)  # [E,k,T]
        for e in range(self.num_experts):
            slot, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            out = self.experts[e](x[token]) * routing_weights[token, slot, None]
            final.index_add_(0, token, out.to(x.dtype))
        return final


class GroupedMMBank(ExpertBank):
    """An expert bank whose slices always run through ``torch._grouped_mm`` (any device)."""

    def forward_slices(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        offs = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_sorted, self.w_in.to(x_sorted.dtype), offs=offs)
        act = expert_activation(h, self.kind)
        return torch._grouped_mm(act, self.w_out.to(x_sorted.dtype), offs=offs)


# --------------------------------------------------------------------------------------------
# Building, checking, timing and measuring the implementations.


@dataclass
class Impl:
    name: str
    fn: Callable[[Tensor], Tensor] | None  # x -> y; None when it cannot run here
    params: list[nn.Parameter]
    note: str = ""


def _moe_fn(m: MoE) -> Callable[[Tensor], Tensor]:
    return lambda x: m(x).y


def build_impls(d: int, h: int, E: int, k: int, device: torch.device, dtype: torch.dtype,
                names=IMPLS, compile_fast: bool = False, seed: int = 0) -> dict[str, Impl]:
    """The implementations at one size, sharing the router and expert weights of one MoE."""
    torch.manual_seed(seed)
    sorted_moe = MoE(d, h, E, k, expert="swiglu", router="topk", dispatch="sorted")

    def twin(**kw) -> MoE:
        m = MoE(d, h, E, k, expert="swiglu", **kw)
        m.load_state_dict(sorted_moe.state_dict(), strict=False)
        return m

    out: dict[str, Impl] = {}
    for name in names:
        note = ""
        if name == "dense bound":
            mod: nn.Module = FeedForward(d, k * h, "swiglu")
            fn = mod
        elif name == "dense gating":
            torch.manual_seed(seed)
            mod = MoE(d, h, E, k, expert="swiglu", router="dense")
            fn = _moe_fn(mod)
            note = f"E/k = {E / k:g} times the expert FLOPs"
        elif name == "mask loop":
            mod = MaskLoopMoE(sorted_moe)
            fn = mod
        elif name == "index_add (HF)":
            mod = IndexAddMoE(sorted_moe)
            fn = mod
        elif name == "moe_lib loop":
            mod = twin(dispatch="loop")
            fn = _moe_fn(mod)
        elif name == "moe_lib sorted":
            mod = sorted_moe
            fn = _moe_fn(mod)
        elif name == "sorted+grouped_mm":
            mod = twin(dispatch="sorted")
            mod.experts = GroupedMMBank(E, d, h, "swiglu")
            mod.experts.load_state_dict(sorted_moe.experts.state_dict())
            fn = _moe_fn(mod)
            if not hasattr(torch, "_grouped_mm"):
                fn, note = None, "torch._grouped_mm is missing in this torch"
        elif name == "sorted+compile":
            mod = twin(dispatch="sorted")
            fn = torch.compile(_moe_fn(mod)) if compile_fast else None
            note = "" if compile_fast else "not run: pass --compile (compiling takes minutes)"
        else:
            raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")
        mod.to(device=device, dtype=dtype)
        out[name] = Impl(name, fn, list(mod.parameters()), note)
    return out


def check_outputs(impls: dict[str, Impl], x: Tensor, n_check: int = 256) -> dict[str, str]:
    """Run every top-k implementation on the first ``n_check`` tokens of ``x`` and compare.

    The reference is moe_lib sorted; float32/float64 outputs must agree to 1e-4 (lower
    precisions only need to run: a bfloat16 router may break near-ties differently).
    ``sorted+compile`` runs on all of ``x``, so that it compiles once, for the timed shape.
    Returns ``{name: note}`` for the implementations that failed to run (they are then skipped).
    """
    failed: dict[str, str] = {}
    exact = x.dtype in (torch.float32, torch.float64)
    ref_small = ref_full = None
    if "moe_lib sorted" in impls:
        ref_small = impls["moe_lib sorted"].fn(x[:n_check]).detach()
    for name, impl in impls.items():
        if impl.fn is None or name in ("dense bound", "dense gating", "moe_lib sorted"):
            continue
        full = name == "sorted+compile"
        try:
            y = impl.fn(x if full else x[:n_check]).detach()
        except Exception as err:  # noqa: BLE001 - report any failure as "n/a"
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            continue
        if full and ref_full is None and "moe_lib sorted" in impls:
            ref_full = impls["moe_lib sorted"].fn(x).detach()
        ref = ref_full if full else ref_small
        if exact and ref is not None:
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4, msg=name)
    return failed


def _step(fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor, g: Tensor) -> None:
    for p in params:
        p.grad = None
    x.grad = None
    fn(x).backward(g)


@contextlib.contextmanager
def _quiet_stderr():
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


def peak_memory(fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor,
                g: Tensor) -> int:
    """Peak bytes held by tensors created during one training step (see the module docstring)."""
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, params, x, g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    for p in params:  # free the old gradients before the profiler starts: not part of the step
        p.grad = None
    x.grad = None
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x).backward(g)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, running)
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads (None: leave as is), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clock(kind: str, device: torch.device) -> Callable[[], float]:
    """``time.perf_counter`` ("wall") or ``time.process_time`` ("process": one CPU thread only)."""
    if kind == "wall":
        return time.perf_counter
    if kind != "process":
        raise ValueError(f"clock must be 'wall' or 'process', got {kind!r}")
    if device.type != "cpu" or torch.get_num_threads() != 1:
        raise ValueError("clock='process' measures work only on a CPU with one thread")
    return time.process_time


def stage_times(d: int, h: int, E: int, k: int, T: int, rounds: int = 7, device="cpu",
                dtype=torch.float32, clock: str = "wall", threads: int | None = None
                ) -> dict[str, float]:
    """Median milliseconds of each stage of the sorted path's forward, and of the dense bound's.

    Stages: router, sort (argsort, inverse, counts), permute (``x[src]``), experts (two grouped
    GEMMs and the activation), combine (unpermute and weighted sum).
    """
    device = torch.device(device)
    with cpu_threads(threads if device.type == "cpu" else None):
        return _stage_times(d, h, E, k, T, rounds, device, dtype, clock)


def _stage_times(d, h, E, k, T, rounds, device, dtype, clock) -> dict[str, float]:
    from moe_lib.dispatch import sort_by_expert
    from moe_lib.permute import make_permutation, permute, unpermute_combine

    torch.manual_seed(0)
    moe = MoE(d, h, E, k).to(device=device, dtype=dtype)
    dense = FeedForward(d, k * h).to(device=device, dtype=dtype)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    now = _clock(clock, device)
    samples: dict[str, list[float]] = {}
    names = ("router", "sort", "permute", "experts", "combine", "dense bound")
    for r in range(rounds + 1):
        marks = [now()]
        routing = moe.router(x)
        _sync(device)
        marks.append(now())
        perm = make_permutation(*sort_by_expert(routing), k)
        _sync(device)
        marks.append(now())
        xs = permute(x, perm)
        _sync(device)
        marks.append(now())
        out = moe.experts.forward_slices(xs, perm.counts)
        _sync(device)
        marks.append(now())
        unpermute_combine(out, routing.weights.to(dtype), perm)
        _sync(device)
        marks.append(now())
        dense(x)
        _sync(device)
        marks.append(now())
        if r:  # round 0 warms up
            for name, a, b in zip(names, marks[:-1], marks[1:], strict=True):
                samples.setdefault(name, []).append(1e3 * (b - a))
    return {name: statistics.median(v) for name, v in samples.items()}


def time_impls(impls: dict[str, Impl], x: Tensor, g: Tensor, rounds: int = 5,
               min_rounds: int = 3, budget_s: float = 60.0, slow=SLOW,
               progress: bool = False, clock: str = "wall", warmup: int = 2,
               warmed: set[str] = frozenset()) -> dict[str, dict[str, float]]:
    """Median forward and forward+backward seconds of each implementation, interleaved.

    ``warmup`` untimed calls each (one less for the ``warmed`` ones, at most one for the slow
    ones), then rounds in rotating order. After ``min_rounds`` rounds,
    the ``slow`` ones stop once ``budget_s`` seconds have passed; the others run ``rounds``.
    ``clock="process"`` times CPU seconds of this process instead of wall seconds: with one
    thread it measures the work done and not the time spent waiting for a core (use it on a
    machine shared with other jobs).
    """
    now = _clock(clock, x.device)
    names = [n for n, impl in impls.items() if impl.fn is not None]
    device = x.device
    for n in names:  # the warm-up also lets the allocator reach its steady state
        calls = min(warmup, 1) if n in slow else warmup
        for _ in range(calls - (n in warmed)):
            _step(impls[n].fn, impls[n].params, x, g)
    _sync(device)
    fwd: dict[str, list[float]] = {n: [] for n in names}
    both: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        over = r >= min_rounds and time.perf_counter() - start > budget_s
        active = [n for n in names if not (over and n in slow)]
        order = active[r % len(active):] + active[: r % len(active)]
        for n in order:
            impl = impls[n]
            for p in impl.params:
                p.grad = None
            x.grad = None
            _sync(device)
            t0 = now()
            y = impl.fn(x)
            _sync(device)
            t1 = now()
            y.backward(g)
            _sync(device)
            t2 = now()
            fwd[n].append(t1 - t0)
            both[n].append(t2 - t0)
            del y
        if progress:
            print(f"  round {r + 1}/{rounds}: {time.perf_counter() - start:.0f} s", flush=True)
    return {n: {"fwd": statistics.median(fwd[n]), "fwdbwd": statistics.median(both[n]),
                "rounds": len(fwd[n])} for n in names}


def gemm_reference(T: int, d: int, h: int, k: int, device: torch.device, dtype: torch.dtype,
                   rounds: int = 5) -> dict[str, float]:
    """One dense GEMM ``[T, d] @ [d, 3*k*h]`` with the expert FLOPs: median fwd, fwd+bwd seconds."""
    a = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, 3 * k * h, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, 3 * k * h, device=device, dtype=dtype)
    ts_f, ts_b = [], []
    for r in range(rounds + 1):
        a.grad = w.grad = None
        _sync(device)
        t0 = time.perf_counter()
        y = a @ w
        _sync(device)
        t1 = time.perf_counter()
        y.backward(g)
        _sync(device)
        t2 = time.perf_counter()
        if r:
            ts_f.append(t1 - t0)
            ts_b.append(t2 - t0)
    return {"fwd": statistics.median(ts_f), "fwdbwd": statistics.median(ts_b)}


def expert_flops(T: int, d: int, h: int, k: int) -> int:
    """Forward FLOPs of the expert GEMMs of a top-k SwiGLU MoE: 2 * T * k * (d*2h + h*d)."""
    return 2 * T * k * 3 * d * h


def compile_report(d: int, h: int, E: int, k: int, T: int = 256) -> str:
    """Where ``torch.compile`` breaks the graph of the sorted path (forward and backward).

    Traces with the "eager" backend (no code generation, so it is quick) and collects dynamo's
    graph-break log: one line per place, with the reason and how often it broke there.
    """
    import linecache
    import logging
    import re

    import torch._dynamo as dynamo

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")
    handler = Collect()
    torch._logging.set_logs(graph_breaks=True)
    log.addHandler(handler)
    log.propagate = False
    try:
        torch.manual_seed(0)
        m = MoE(d, h, E, k, dispatch="sorted")
        x = torch.randn(T, d, requires_grad=True)
        dynamo.reset()
        torch.compile(_moe_fn(m), backend="eager")(x).sum().backward()
    finally:
        log.removeHandler(handler)
        log.propagate = True
        torch._logging.set_logs()
        dynamo.reset()
    places: dict[str, int] = {}
    for msg in records:
        where = re.search(r"in user code at (\S+):(\d+)", msg)
        if not where:
            continue
        body = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
        reason = body[1] if len(body) > 1 else "?"  # e.g. "Data dependent operator"
        code = linecache.getline(where.group(1), int(where.group(2))).strip()
        key = f"{Path(where.group(1)).name}:{where.group(2)} ({reason}): {code[:60]}"
        places[key] = places.get(key, 0) + 1
    out = [f"torch.compile of moe_lib sorted: {sum(places.values())} graph breaks"]
    out += [f"  {n} x {key}" for key, n in places.items()]
    return "\n".join(out)


def run_benchmark(sizes, names=IMPLS, device="cpu", dtype=torch.float32, rounds: int = 5,
                  min_rounds: int = 3, budget_s: float = 30.0, threads: int | None = 2,
                  compile_fast: bool = False, memory: bool = True, flops: bool = False,
                  progress: bool = False, clock: str = "wall") -> list[dict]:
    """Benchmark ``names`` at each ``(d, h, E, k, T)`` in ``sizes``; one row dict per (size, impl).

    Row keys: d, h, E, k, T, impl, fwd_ms, fwdbwd_ms, peak_mib, fwd_ratio, fwdbwd_ratio,
    mem_ratio (ratios to the dense bound), rounds, note; with ``flops``, also tflops_fwd,
    tflops_fwdbwd and a "dense GEMM" row.
    """
    device = torch.device(device)
    with cpu_threads(threads if device.type == "cpu" else None):
        return _run_benchmark(sizes, names, device, dtype, rounds, min_rounds, budget_s,
                              compile_fast, memory, flops, progress, clock)


def _run_benchmark(sizes, names, device, dtype, rounds, min_rounds, budget_s, compile_fast,
                   memory, flops, progress, clock) -> list[dict]:
    rows: list[dict] = []
    for d, h, E, k, T in sizes:
        if progress:
            print(f"size d={d} h={h} E={E} k={k} T={T}", flush=True)
        impls = build_impls(d, h, E, k, device, dtype, names, compile_fast)
        torch.manual_seed(1)
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(T, d, device=device, dtype=dtype)
        failed = check_outputs(impls, x.detach())
        for n, why in failed.items():
            impls[n].fn, impls[n].note = None, why
        # peak memory first: the profiled step doubles as the first warm-up call (the peak of a
        # first call equals that of later ones), except for the compiled layer, whose first
        # call compiles: it is measured after the timing
        mem = {}
        ready = [n for n, impl in impls.items() if impl.fn is not None]
        early = [n for n in ready if n != "sorted+compile"] if memory else []
        for n in early:
            mem[n] = peak_memory(impls[n].fn, impls[n].params, x, g)
        times = time_impls(impls, x, g, rounds, min_rounds, budget_s, progress=progress,
                           clock=clock, warmed=set(early))
        for n in ready:
            if memory and n not in mem:
                mem[n] = peak_memory(impls[n].fn, impls[n].params, x, g)
        ref = times.get("dense bound")
        ref_mem = mem.get("dense bound")
        fl = expert_flops(T, d, h, k)
        extra = []
        if flops:
            extra.append(("dense GEMM", gemm_reference(T, d, h, k, device, dtype, rounds)))
        for n, impl in impls.items():
            row = dict(d=d, h=h, E=E, k=k, T=T, impl=n, note=impl.note)
            t = times.get(n)
            if t is not None:
                row.update(fwd_ms=1e3 * t["fwd"], fwdbwd_ms=1e3 * t["fwdbwd"], rounds=t["rounds"])
                if ref:
                    row.update(fwd_ratio=t["fwd"] / ref["fwd"],
                               fwdbwd_ratio=t["fwdbwd"] / ref["fwdbwd"])
                if flops:
                    row.update(tflops_fwd=fl / t["fwd"] / 1e12,
                               tflops_fwdbwd=3 * fl / t["fwdbwd"] / 1e12)
            if n in mem:
                row["peak_mib"] = mem[n] / 2**20
                if ref_mem:
                    row["mem_ratio"] = mem[n] / ref_mem
            rows.append(row)
        for n, t in extra:
            rows.append(dict(d=d, h=h, E=E, k=k, T=T, impl=n, note="same FLOPs, one GEMM",
                             fwd_ms=1e3 * t["fwd"], fwdbwd_ms=1e3 * t["fwdbwd"],
                             tflops_fwd=fl / t["fwd"] / 1e12,
                             tflops_fwdbwd=3 * fl / t["fwdbwd"] / 1e12))
        del impls, x, g
        gc.collect()
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one block per size."""

    def f(v, fmt):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return format("n/a", ">" + fmt.split(".")[0])
        return format(v, fmt)

    has_flops = any("tflops_fwd" in r for r in rows)
    head = (f"{'implementation':<19}{'fwd ms':>9}{'x dense':>8}{'fwd+bwd ms':>11}{'x dense':>8}"
            f"{'peak MiB':>9}{'x dense':>8}")
    if has_flops:
        head += f"{'TFLOP/s f':>10}{'f+b':>7}"
    lines = []
    key = None
    for r in rows:
        size = (r["d"], r["h"], r["E"], r["k"], r["T"])
        if size != key:
            key = size
            lines += ["", "d_model={} d_hidden={} experts={} k={} tokens={}".format(*size), head,
                      "-" * len(head)]
        line = (f"{r['impl']:<19}{f(r.get('fwd_ms'), '9.1f')}{f(r.get('fwd_ratio'), '8.2f')}"
                f"{f(r.get('fwdbwd_ms'), '11.1f')}{f(r.get('fwdbwd_ratio'), '8.2f')}"
                f"{f(r.get('peak_mib'), '9.1f')}{f(r.get('mem_ratio'), '8.2f')}")
        if has_flops:
            line += f"{f(r.get('tflops_fwd'), '10.1f')}{f(r.get('tflops_fwdbwd'), '7.1f')}"
        if r.get("note"):
            line += f"  ({r['note']})"
        lines.append(line)
    return "\n".join(lines)


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return float("nan")


def parse_sizes(text: str) -> list[tuple[int, int, int, int, int]]:
    """``"d,h,E,k,T;d,h,E,k,T"`` -> list of 5-tuples."""
    sizes = []
    for part in text.split(";"):
        vals = tuple(int(v) for v in part.split(","))
        if len(vals) != 5:
            raise argparse.ArgumentTypeError(f"a size is d,h,E,k,T; got {part!r}")
        sizes.append(vals)
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help='"d,h,E,k,T;..." (default: the three sizes of issue #4)')
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="GPU sizes (bfloat16 on CUDA); prints TFLOP/s")
    p.add_argument("--quick", action="store_true",
                   help="chapter 6's run: one size, no dense gating, 1 thread, process clock, "
                        "7 rounds (each can be overridden)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--impls", default=None, help="comma-separated subset of: " + ", ".join(IMPLS))
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 9; --quick 7)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds per size after which the slow baselines stop (at min-rounds)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads, torch.set_num_threads (default 2; --quick 1)")
    p.add_argument("--clock", choices=["wall", "process"], default=None,
                   help="process: CPU time of this process, needs --threads 1, for busy machines "
                        "(default wall; --quick process)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of sorted")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)

    sizes = args.sizes or TARGET_SIZES
    dtype = getattr(torch, args.dtype)
    flops = args.device.startswith("cuda")
    if args.preset:
        sizes = args.sizes or PRESETS[args.preset]
        if args.device == "cpu":
            args.device = "cuda"
        if args.dtype == "float32":
            dtype = torch.bfloat16
        flops = True
    quick = args.quick and not args.device.startswith("cuda")
    if args.quick:
        sizes = args.sizes or QUICK_SIZES
    if args.impls is None:
        args.impls = ",".join(QUICK_IMPLS if args.quick else IMPLS)
    if args.rounds is None:
        args.rounds = 7 if args.quick else 9
    if args.threads is None:
        args.threads = 1 if quick else 2
    if args.clock is None:
        args.clock = "process" if quick and args.threads == 1 else "wall"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda (or --preset) needs a CUDA GPU; none is visible to torch")
    names = tuple(n.strip() for n in args.impls.split(","))
    if args.compile and args.device == "cpu":
        print(compile_report(*sizes[0][:4]))

    t0 = time.perf_counter()
    load0 = _load()
    rows = run_benchmark(sizes, names, args.device, dtype, args.rounds, args.min_rounds,
                         args.budget, args.threads, args.compile, not args.no_memory, flops,
                         progress=True, clock=args.clock)
    print(f"device={args.device} dtype={dtype} threads={args.threads} "
          f"clock={args.clock} torch={torch.__version__}; medians of up to {args.rounds} "
          f"interleaved rounds; x dense: ratio to the dense bound (FeedForward of hidden k*h)")
    print(format_table(rows))
    load1 = _load()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; 1-minute load average {load0} at the "
          f"start, {load1} at the end, on {os.cpu_count()} CPUs")
    busy = max(load0, load1) > (os.cpu_count() or 1) - 0.5
    if args.device == "cpu" and args.threads != 1 and busy:
        print("warning: the machine was busy. With several threads, each parallel region waits "
              "for a descheduled thread,\nso implementations made of many small operations look "
              "much slower than they are; use --threads 1 --clock process.")


if __name__ == "__main__":
    main()
