"""Dispatch benchmark: MoE layers against the dense FFN with the same active FLOPs.

An MoE layer with E SwiGLU experts of hidden h and top-k routing does the GEMM FLOPs of a dense
SwiGLU FFN of hidden k*h (``FeedForward(d, k*h, "swiglu")``, "the dense bound"), plus routing
(T*d*E) and two permutations of the activations. This benchmark times, side by side in one
process, the implementations of :mod:`moe_lib.bench.impls` (dense bound, dense gating, the mask
loop and Hugging Face's index_add loop, moe_lib's loop and sorted dispatches, the sorted path
with ``torch._grouped_mm`` and under ``torch.compile``). Every top-k implementation shares the
router and expert weights of one ``MoE``; their outputs are checked against each other before
timing.

Timing (:mod:`moe_lib.bench.timing`): warm-up calls, then interleaved rounds in rotating order,
medians of forward and of forward+backward (with the input gradient), ratios to the dense bound.
Slow baselines stop after ``min_rounds`` rounds once the time budget is used. Peak memory is
exact: the profiler's record of every allocation and free of one training step.

GPU presets (``--preset mixtral``: d_model 4096, d_hidden 14336, 8 experts, k=2;
``--preset finegrained``: DeepSeekMoE-16B-like d_model 2048, d_hidden 1408, 64 experts, k=6;
both bfloat16 on CUDA) also print the achieved TFLOP/s of the expert GEMMs, 2*T*k*3*d*h per
forward (x3 with backward), against one dense GEMM with the same FLOPs.

    python -m moe_lib.bench.dispatch                  # the three CPU sizes of issue #4
    python -m moe_lib.bench.dispatch --quick          # chapter 6's run (1 thread, CPU time)
    python -m moe_lib.bench.dispatch --sizes 64,128,8,2,4096 --compile
    python -m moe_lib.bench.dispatch --device cuda --dtype bfloat16 --preset mixtral

From Python: ``run_benchmark(DispatchBenchConfig(sizes=[(d, h, E, k, T)], ...))`` returns one row
dict per (size, implementation); ``format_table(rows)`` prints them.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_lib.bench import cli
from moe_lib.bench.graph_breaks import compile_report
from moe_lib.bench.impls import (
    IMPLS,
    REGISTRY,
    SLOW,
    Built,
    Context,
    build_impls,
    check_dtype,
    check_names,
    check_outputs,
    check_size,
    layer_fn,
    register,
)
from moe_lib.bench.machine import cpu_model
from moe_lib.bench.stages import stage_times
from moe_lib.bench.timing import CLOCKS, load_average, peak_memory, time_impls
from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int,
    check_int_range,
    check_nonnegative,
    check_positive_int,
    check_type,
)
from moe_lib.runtime import as_device, available_device, cpu_threads, synchronize

__all__ = [
    "DEEPSEEK_IMPLS", "DEEPSEEK_SIZES", "IMPLS", "PRESETS", "QUICK_IMPLS", "QUICK_SIZES",
    "REGISTRY", "SLOW", "TARGET_SIZES",
    "Built", "Context", "DispatchBenchConfig", "build_impls", "check_outputs", "compile_report",
    "expert_flops", "format_table", "gemm_reference", "layer_fn", "main", "parse_sizes",
    "register", "run_benchmark", "stage_times",
]

Size = tuple[int, int, int, int, int]  # (d_model, d_hidden, experts, k, tokens)

TARGET_SIZES: list[Size] = [(512, 1024, 8, 2, 4096), (64, 128, 8, 2, 16384),
                            (128, 256, 32, 2, 8192)]
# --quick: the run of chapter 6 (one of the issue's sizes, without the slowest baseline).
QUICK_SIZES: list[Size] = [(128, 256, 32, 2, 8192)]
PRESETS: dict[str, list[Size]] = {
    "mixtral": [(4096, 14336, 8, 2, 8192)],
    "finegrained": [(2048, 1408, 64, 6, 8192)],
}
QUICK_IMPLS = ("dense bound", "mask loop", "index_add (HF)", "moe_lib loop", "moe_lib sorted",
               "sorted+grouped_mm")
# --deepseek: a DeepSeek-style layer (many small experts, a shared expert, sigmoid scores,
# group-limited selection) at a CPU size, against its own FLOP-matched dense FFN (hidden
# (k + 1) h), beside the plain top-k layer of the same size against the dense bound.
DEEPSEEK_SIZES: list[Size] = [(256, 64, 64, 6, 4096)]
DEEPSEEK_IMPLS = ("dense bound", "moe_lib sorted", "deepseek dense bound",
                  "deepseek-style sorted", "deepseek-style loop")
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_sizes(sizes: object) -> tuple[Size, ...]:
    flat = isinstance(sizes, tuple) and sizes and not isinstance(sizes[0], (list, tuple))
    if flat or isinstance(sizes, str) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a list of (d, h, E, k, T) tuples, got "
                        f"{type(sizes).__name__} {sizes!r}")
    if not sizes:
        raise ValueError("sizes must hold at least one (d, h, E, k, T) tuple, got none")
    out = []
    for i, size in enumerate(sizes):
        if not isinstance(size, (tuple, list)):
            raise TypeError(f"sizes[{i}] must be a (d, h, E, k, T) tuple of 5 ints, got "
                            f"{type(size).__name__} {size!r}")
        if len(size) != 5:
            raise ValueError(f"sizes[{i}] must be a (d, h, E, k, T) tuple of 5 ints, got "
                             f"{size!r}")
        check_size(f"sizes[{i}].", *size[:4])
        check_positive_int(f"sizes[{i}].T", size[4])
        out.append(tuple(int(v) for v in size))
    return tuple(out)


@dataclass(frozen=True)
class DispatchBenchConfig:
    """One benchmark run, checked when the config is made (before any work).

    Args:
        sizes: ``(d_model, d_hidden, experts, k, tokens)`` tuples, each with 1 <= k <= experts.
        impls: names registered in :data:`moe_lib.bench.impls.REGISTRY` (default: all built-in).
        device: where to run; a CUDA device must be visible to torch.
        dtype: float32 | float64 | bfloat16 | float16.
        rounds: timed rounds (>= 1). min_rounds: rounds before the slow implementations may stop,
            in [1, rounds]; None: min(3, rounds).
        budget_s: seconds per size after which the slow implementations stop (>= 0).
        threads: CPU threads while timing (None: as set; ignored on a GPU).
        compile: also build and time ``torch.compile`` of the sorted path (minutes on a CPU).
        memory: measure the peak memory of one training step.
        flops: add achieved TFLOP/s of the expert GEMMs and a "dense GEMM" row with their FLOPs.
        progress: print the size and each round.
        clock: "wall" or "process" (CPU time of this process: a CPU and ``threads=1`` only).
    """

    sizes: Sequence[Size]
    impls: Sequence[str] = IMPLS
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    rounds: int = 5
    min_rounds: int | None = None
    budget_s: float = 30.0
    threads: int | None = 2
    compile: bool = False
    memory: bool = True
    flops: bool = False
    progress: bool = False
    clock: str = "wall"

    def __post_init__(self) -> None:
        self._set("sizes", _check_sizes(self.sizes))
        self._set("impls", check_names("impls", self.impls))
        device = available_device(self.device)
        self._set("device", device)
        check_dtype("dtype", self.dtype)
        check_positive_int("rounds", self.rounds)
        if self.min_rounds is None:
            self._set("min_rounds", min(3, self.rounds))
        check_int_range("min_rounds", self.min_rounds, 1, self.rounds)
        check_nonnegative("budget_s", self.budget_s)
        self._set("budget_s", float(self.budget_s))
        if self.threads is not None:
            check_int("threads", self.threads, low=1)
        for name in ("compile", "memory", "flops", "progress"):
            check_bool(name, getattr(self, name))
        check_choice("clock", self.clock, CLOCKS)
        if self.clock == "process" and (device.type != "cpu" or self.threads not in (1, None)):
            raise ValueError(f"clock='process' measures work only on a CPU with threads=1, got "
                             f"device={device.type!r}, threads={self.threads}")

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # the checked, resolved value of a frozen field


def expert_flops(T: int, d: int, h: int, k: int) -> int:
    """Forward FLOPs of the expert GEMMs of a top-k SwiGLU MoE: 2 * T * k * (d*2h + h*d)."""
    for name, v in (("T", T), ("d", d), ("h", h), ("k", k)):
        check_positive_int(name, v)
    return 2 * T * k * 3 * d * h


def gemm_reference(T: int, d: int, h: int, k: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, rounds: int = 5) -> dict[str, float]:
    """One dense GEMM ``[T, d] @ [d, 3*k*h]`` with the expert FLOPs: median fwd, fwd+bwd seconds
    of ``rounds`` rounds after one warm-up."""
    for name, v in (("T", T), ("d", d), ("h", h), ("k", k), ("rounds", rounds)):
        check_positive_int(name, v)
    device = as_device(device)
    check_dtype("dtype", dtype)
    a = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, 3 * k * h, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, 3 * k * h, device=device, dtype=dtype)
    ts_f, ts_b = [], []
    for r in range(rounds + 1):
        a.grad = w.grad = None
        synchronize(device)
        t0 = time.perf_counter()
        y = a @ w
        synchronize(device)
        t1 = time.perf_counter()
        y.backward(g)
        synchronize(device)
        t2 = time.perf_counter()
        if r:
            ts_f.append(t1 - t0)
            ts_b.append(t2 - t0)
    return {"fwd": statistics.median(ts_f), "fwdbwd": statistics.median(ts_b)}


def run_benchmark(config: DispatchBenchConfig) -> list[dict]:
    """Benchmark ``config.impls`` at each size of ``config.sizes``; one row dict per
    (size, implementation).

    Row keys: d, h, E, k, T, impl, note, and where measured fwd_ms, fwdbwd_ms, rounds, peak_mib,
    fwd_ratio, fwdbwd_ratio, mem_ratio (ratios to the dense bound); with ``flops``, also
    tflops_fwd, tflops_fwdbwd and a "dense GEMM" row.
    """
    check_type("config", config, DispatchBenchConfig)
    c = config
    with cpu_threads(c.threads if c.device.type == "cpu" else None):
        rows: list[dict] = []
        for size in c.sizes:
            rows += _run_size(c, *size)
        return rows


def _run_size(c: DispatchBenchConfig, d: int, h: int, E: int, k: int, T: int) -> list[dict]:
    if c.progress:
        print(f"size d={d} h={h} E={E} k={k} T={T}", flush=True)
    impls = build_impls(d, h, E, k, c.device, c.dtype, c.impls, c.compile)
    torch.manual_seed(1)
    x = torch.randn(T, d, device=c.device, dtype=c.dtype, requires_grad=True)
    g = torch.randn(T, d, device=c.device, dtype=c.dtype)
    failed = check_outputs(impls, x.detach())
    for n, why in failed.items():
        impls[n].fn, impls[n].note = None, why
    # peak memory first: the profiled step doubles as the first warm-up call (the peak of a
    # first call equals that of later ones), except for a compiled layer, whose first call
    # compiles: it is measured after the timing
    mem: dict[str, int] = {}
    ready = [n for n, impl in impls.items() if impl.fn is not None]
    compiles = {n for n in ready if n in REGISTRY and REGISTRY[n].compiles}
    early = [n for n in ready if n not in compiles] if c.memory else []
    for n in early:
        mem[n] = peak_memory(impls[n].fn, impls[n].params, x, g)
    slow = [n for n in impls if n in REGISTRY and REGISTRY[n].slow]
    times = time_impls(impls, x, g, c.rounds, c.min_rounds, c.budget_s, slow=slow,
                       progress=c.progress, clock=c.clock, warmed=set(early))
    for n in ready:
        if c.memory and n not in mem:
            mem[n] = peak_memory(impls[n].fn, impls[n].params, x, g)
    fl = expert_flops(T, d, h, k)
    rows = []
    for n, impl in impls.items():
        bound = REGISTRY[n].bound if n in REGISTRY else "dense bound"
        ref, ref_mem = times.get(bound), mem.get(bound)
        row = dict(d=d, h=h, E=E, k=k, T=T, impl=n, note=impl.note)
        t = times.get(n)
        if t is not None:
            row.update(fwd_ms=1e3 * t["fwd"], fwdbwd_ms=1e3 * t["fwdbwd"], rounds=t["rounds"])
            if ref:
                row.update(fwd_ratio=t["fwd"] / ref["fwd"],
                           fwdbwd_ratio=t["fwdbwd"] / ref["fwdbwd"])
            if c.flops:
                row.update(tflops_fwd=fl / t["fwd"] / 1e12,
                           tflops_fwdbwd=3 * fl / t["fwdbwd"] / 1e12)
        if n in mem:
            row["peak_mib"] = mem[n] / 2**20
            if ref_mem:
                row["mem_ratio"] = mem[n] / ref_mem
        rows.append(row)
    if c.flops:
        t = gemm_reference(T, d, h, k, c.device, c.dtype, c.rounds)
        rows.append(dict(d=d, h=h, E=E, k=k, T=T, impl="dense GEMM", note="same FLOPs, one GEMM",
                         fwd_ms=1e3 * t["fwd"], fwdbwd_ms=1e3 * t["fwdbwd"],
                         tflops_fwd=fl / t["fwd"] / 1e12,
                         tflops_fwdbwd=3 * fl / t["fwdbwd"] / 1e12))
    del impls, x, g
    gc.collect()
    return rows


_ROW_KEYS = ("d", "h", "E", "k", "T", "impl")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`run_benchmark`'s rows: one block per size, "n/a" where a
    value was not measured, the note in brackets."""
    check_type("rows", rows, list)
    for i, r in enumerate(rows):
        check_type(f"rows[{i}]", r, dict)
        missing = [key for key in _ROW_KEYS if key not in r]
        if missing:
            raise ValueError(f"rows[{i}] must have the keys {_ROW_KEYS}, misses {missing}")

    def f(v, fmt):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return format("n/a", ">" + fmt.split(".")[0])
        return format(v, fmt)

    has_flops = any("tflops_fwd" in r for r in rows)
    w = max([19] + [len(r["impl"]) + 1 for r in rows])
    head = (f"{'implementation':<{w}}{'fwd ms':>9}{'x dense':>8}{'fwd+bwd ms':>11}{'x dense':>8}"
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
        line = (f"{r['impl']:<{w}}{f(r.get('fwd_ms'), '9.1f')}{f(r.get('fwd_ratio'), '8.2f')}"
                f"{f(r.get('fwdbwd_ms'), '11.1f')}{f(r.get('fwdbwd_ratio'), '8.2f')}"
                f"{f(r.get('peak_mib'), '9.1f')}{f(r.get('mem_ratio'), '8.2f')}")
        if has_flops:
            line += f"{f(r.get('tflops_fwd'), '10.1f')}{f(r.get('tflops_fwdbwd'), '7.1f')}"
        if r.get("note"):
            line += f"  ({r['note']})"
        lines.append(line)
    return "\n".join(lines)


def parse_sizes(text: str) -> list[Size]:
    """``"d,h,E,k,T;d,h,E,k,T"`` -> list of 5-tuples (an ``argparse.ArgumentTypeError`` for a
    malformed one, so that argparse reports it as a usage error)."""
    return cli.parse_size_list(text, "d,h,E,k,T")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_lib.bench.dispatch",
                                description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help='"d,h,E,k,T;..." (default: the three sizes of issue #4)')
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="GPU sizes (bfloat16 on CUDA); prints TFLOP/s")
    p.add_argument("--deepseek", action="store_true",
                   help="a DeepSeek-style layer (64 experts of hidden 64, k=6, one shared expert, "
                        "sigmoid, groups) against its own FLOP-matched dense FFN, on a CPU")
    p.add_argument("--quick", action="store_true",
                   help="chapter 6's run: one size, no dense gating, 1 thread, process clock, "
                        "7 rounds (each can be overridden)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES))
    p.add_argument("--impls", default=None,
                   help="comma-separated subset of: " + ", ".join(REGISTRY))
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 9; --quick 7)")
    p.add_argument("--min-rounds", type=int, default=None,
                   help="rounds before the slow baselines may stop (default min(3, rounds))")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds per size after which the slow baselines stop (at min-rounds)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads, torch.set_num_threads (default 2; --quick 1)")
    p.add_argument("--clock", choices=list(CLOCKS), default=None,
                   help="process: CPU time of this process, needs --threads 1, for busy machines "
                        "(default wall; --quick process)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of sorted")
    p.add_argument("--no-memory", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.dispatch --help``): prints the table."""
    p = _parser()
    args = p.parse_args(argv)
    sizes = args.sizes or TARGET_SIZES
    dtype = DTYPE_NAMES[args.dtype]
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
    if args.deepseek:
        sizes = args.sizes or DEEPSEEK_SIZES
    if args.impls is None:
        args.impls = ",".join(QUICK_IMPLS if args.quick else
                              DEEPSEEK_IMPLS if args.deepseek else IMPLS)
    if args.rounds is None:
        args.rounds = 7 if args.quick else 9
    if args.threads is None:
        args.threads = 1 if quick else 2
    if args.clock is None:
        args.clock = "process" if quick and args.threads == 1 else "wall"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda (or --preset) needs a CUDA GPU; none is visible to torch")
    names = tuple(n.strip() for n in args.impls.split(","))
    try:
        config = DispatchBenchConfig(
            sizes, names, args.device, dtype, args.rounds, args.min_rounds, args.budget,
            args.threads, args.compile, not args.no_memory, flops, progress=True,
            clock=args.clock)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    if args.compile and config.device.type == "cpu":
        print(compile_report(*config.sizes[0][:4]))

    t0 = time.perf_counter()
    load0 = load_average()
    rows = run_benchmark(config)
    print(f"device={args.device} dtype={dtype} threads={args.threads} "
          f"clock={args.clock} torch={torch.__version__}; medians of up to {args.rounds} "
          f"interleaved rounds; x dense: ratio to the dense bound (FeedForward of hidden k*h; "
          f"for the deepseek-style rows, of hidden (k+1)*h: the shared expert included)")
    print(format_table(rows))
    load1 = load_average()
    gpu = (f", GPU: {torch.cuda.get_device_name(config.device)}"
           if config.device.type == "cuda" else "")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; 1-minute load average {load0} at the "
          f"start, {load1} at the end, on {os.cpu_count()} CPUs ({cpu_model()}{gpu})")
    busy = max(load0, load1) > (os.cpu_count() or 1) - 0.5
    if config.device.type == "cpu" and args.threads != 1 and busy:
        print("warning: the machine was busy. With several threads, each parallel region waits "
              "for a descheduled thread,\nso implementations made of many small operations look "
              "much slower than they are; use --threads 1 --clock process.")


if __name__ == "__main__":
    main()
