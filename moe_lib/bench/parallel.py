"""Expert parallelism: step time and bytes sent with 1, 2 and 4 ranks (gloo on CPUs, NCCL on
GPUs).

Each rank holds E / N experts of one :class:`~moe_lib.layer.MoE` (:mod:`moe_lib.parallel`) and
its own ``tokens`` tokens (tokens per rank are fixed, experts per rank shrink: the usual weak
scaling of expert parallelism). A step is a forward pass, ``(y * g).sum() + aux_loss`` and its
backward pass. Per rank and step the benchmark records:

- the wall time of the step (after a barrier; the step of the job is the slowest rank's) and the
  process CPU time (on a CPU with one thread per rank: the work the rank did);
- the token rows it exchanged (:class:`~moe_lib.parallel.Traffic`, from the split sizes) and the
  bytes its process wrote to sockets, read from ``/proc/self/io`` (``wchar``, Linux): on
  loopback these are the bytes gloo really sent, headers and count exchanges included;
- the rows its experts processed (its load), and the copies it sent to each expert.

``skew`` adds a constant to the router logits of the first quarter of the experts (the experts
of rank 0 with 4 ranks), so that they receive more than their share: the slowest rank then sets
the step time. The model of the bytes is :func:`moe_lib.parallel.traffic_model`,
``2 T k d b (N - 1) / N`` per forward pass (the backward pass sends as much again).

On a CPU the ranks share the cores: with more ranks than cores (4 ranks on 2 cores) the wall
times measure the oversubscription as much as the method; the CPU times and bytes do not.

    python -m moe_lib.bench.parallel --quick
    python -m moe_lib.bench.parallel --world-sizes 1 2 4 --skews 0 4 --out parallel.json
    python -m moe_lib.bench.parallel --backend nccl      # one GPU per rank
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from moe_lib.bench import cli
from moe_lib.bench.machine import machine_record
from moe_lib.checks import (
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_type,
)
from moe_lib.layer import MoE
from moe_lib.parallel import BACKENDS, START_METHODS, expert_parallel, spawn, traffic_model
from moe_lib.runtime import cpu_threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROC_IO = Path("/proc/self/io")


@dataclass(frozen=True)
class ParallelSettings:
    """One benchmark configuration, checked when made.

    ``d_model``, ``d_hidden`` (of each SwiGLU expert), ``num_experts`` (E, divisible by every
    world size), ``top_k``, ``tokens`` (per rank), ``steps`` (timed), ``warmup`` (untimed
    steps first), ``dtype`` ("float32" | "bfloat16"), ``seed``.
    """

    d_model: int = 256
    d_hidden: int = 512
    num_experts: int = 8
    top_k: int = 2
    tokens: int = 2048
    steps: int = 10
    warmup: int = 2
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts", "tokens", "steps"):
            check_positive_int(name, getattr(self, name))
        check_int("top_k", self.top_k, low=1, high=self.num_experts)
        check_int("warmup", self.warmup, low=0)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_int("seed", self.seed, low=0, high=2**32 - 1)

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = ParallelSettings(d_model=64, d_hidden=128, tokens=512, steps=4, warmup=1)
FULL = ParallelSettings()


def socket_bytes_written() -> int | None:
    """Bytes this process has written with write-like system calls (``wchar`` of
    ``/proc/self/io``: files, pipes and sockets); None where the file does not exist."""
    try:
        text = PROC_IO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "wchar":
            return int(value)
    return None


def hot_experts(num_experts: int) -> range:
    """The experts that ``skew`` favours: the first quarter (at least one)."""
    check_positive_int("num_experts", num_experts)
    return range(max(1, num_experts // 4))


def build_layer(settings: ParallelSettings, skew: float, device: torch.device) -> MoE:
    """The benchmark's layer (the same on every rank): SwiGLU experts, top-k, Switch loss, a
    router bias that is ``skew`` on :func:`hot_experts` and 0 elsewhere."""
    check_type("settings", settings, ParallelSettings)
    check_nonnegative("skew", skew)
    s = settings
    torch.manual_seed(s.seed)
    layer = MoE(s.d_model, s.d_hidden, s.num_experts, top_k=s.top_k, balance_loss="switch",
                router_bias=True)
    with torch.no_grad():
        layer.router.gate.bias[list(hot_experts(s.num_experts))] = float(skew)
    return layer.to(device)


def measure_rank(rank: int, world_size: int, settings: ParallelSettings, skew: float,
                 backend: str) -> dict:
    """What one rank measures (runs inside a rank of :func:`moe_lib.parallel.spawn`)."""
    check_type("settings", settings, ParallelSettings)
    check_choice("backend", backend, BACKENDS)
    s = settings
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    dtype = DTYPES[s.dtype]
    ep = expert_parallel(build_layer(s, skew, device))
    gen = torch.Generator().manual_seed(s.seed * 1000 + rank + 1)
    x = torch.randn(s.tokens, s.d_model, generator=gen).to(device, dtype)
    g = torch.randn(s.tokens, s.d_model, generator=gen).to(device, dtype)
    # "cpu": the process's CPU time (gloo's own threads included: when ranks share cores, a
    # waiting rank's communication threads also burn CPU); "thread_cpu": the calling thread's
    # alone, where this rank's forward and backward compute runs: its work.
    rec: dict = {"rank": rank, "wall": [], "cpu": [], "thread_cpu": [], "wire_fwd": [],
                 "wire_bwd": []}
    for step in range(s.warmup + s.steps):
        for p in ep.parameters():
            p.grad = None
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w0, c0, io0 = time.perf_counter(), time.process_time(), socket_bytes_written()
        t0 = time.thread_time()
        out = ep(x)
        io1 = socket_bytes_written()
        ((out.y * g).sum() + out.aux_loss).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.thread_time()
        w1, c1, io2 = time.perf_counter(), time.process_time(), socket_bytes_written()
        if step < s.warmup:
            continue
        rec["wall"].append(w1 - w0)
        rec["cpu"].append(c1 - c0)
        rec["thread_cpu"].append(t1 - t0)
        if io0 is not None and device.type == "cpu":
            rec["wire_fwd"].append(io1 - io0)
            rec["wire_bwd"].append(io2 - io1)
    t = ep.last_traffic
    rec.update(send_rows=t.send_rows, recv_rows=t.recv_rows, bytes_sent=t.bytes_sent,
               rows_sent=t.rows_sent, expert_rows=sum(t.recv_rows),
               expert_counts=out.routing.tokens_per_expert.tolist(),
               dropped=out.routing.dropped)
    return rec


def summarise(records: list[dict], settings: ParallelSettings, skew: float) -> dict:
    """One table row from the ranks' records of one (world size, skew)."""
    check_type("records", records, list)
    if not records:
        raise ValueError("records must hold one record per rank, got none")
    check_type("settings", settings, ParallelSettings)
    s, N = settings, len(records)
    steps = len(records[0]["wall"])
    step = [max(r["wall"][i] for r in records) for i in range(steps)]  # the slowest rank
    cpu = [statistics.median(r["cpu"]) for r in records]
    rows = [r["expert_rows"] for r in records]
    itemsize = torch.empty((), dtype=DTYPES[s.dtype]).element_size()
    wire = [statistics.median(r["wire_fwd"]) for r in records if r["wire_fwd"]]
    wire_bwd = [statistics.median(r["wire_bwd"]) for r in records if r["wire_bwd"]]
    return {
        "world_size": N, "skew": float(skew),
        "step_ms": 1e3 * statistics.median(step),
        "cpu_ms_max": 1e3 * max(cpu), "cpu_ms_mean": 1e3 * statistics.fmean(cpu),
        "expert_rows": rows, "load_max_over_mean": max(rows) / max(statistics.fmean(rows), 1e-9),
        "bytes_sent_counted": statistics.fmean(r["bytes_sent"] for r in records),
        "bytes_sent_wire_fwd": statistics.fmean(wire) if wire else None,
        "bytes_sent_wire_bwd": statistics.fmean(wire_bwd) if wire_bwd else None,
        "bytes_model": traffic_model(s.tokens, s.top_k, s.d_model, itemsize, N),
        "dropped": sum(r["dropped"] for r in records),
    }


def run(settings: ParallelSettings, world_sizes: list[int], skews: list[float],
        backend: str = "gloo", start_method: str = "spawn",
        timeout: float = 600.0) -> tuple[list[dict], list[list[dict]]]:
    """Every (world size, skew): start the ranks, measure, summarise. Returns the table rows
    and the raw per-rank records (same order)."""
    check_type("settings", settings, ParallelSettings)
    check_type("world_sizes", world_sizes, list)
    check_type("skews", skews, list)
    if not world_sizes or not skews:
        raise ValueError("world_sizes and skews must each hold at least one value")
    for i, n in enumerate(world_sizes):
        check_positive_int(f"world_sizes[{i}]", n)
        if settings.num_experts % n:
            raise ValueError(f"world_sizes[{i}]={n} must divide num_experts="
                             f"{settings.num_experts}")
    for i, v in enumerate(skews):
        check_nonnegative(f"skews[{i}]", v)
    check_choice("backend", backend, BACKENDS)
    check_choice("start_method", start_method, START_METHODS)
    check_positive("timeout", timeout)
    rows, raw = [], []
    for n in world_sizes:
        for skew in skews:
            records = spawn(measure_rank, n, (settings, float(skew), backend), backend=backend,
                            timeout=timeout, start_method=start_method)
            rows.append(summarise(records, settings, skew))
            raw.append(records)
    return rows, raw


def format_table(rows: list[dict]) -> str:
    """The rows as a text table (bytes per rank and forward pass)."""
    check_type("rows", rows, list)

    def kib(v: float | None) -> str:
        return "-" if v is None else f"{v / 1024:.1f}"

    head = (f"{'ranks':>5}{'skew':>6}{'step ms':>9}{'cpu ms max':>11}{'mean':>7}"
            f"{'load max/mean':>14}{'KiB sent':>10}{'on wire':>9}{'model':>8}{'counted/model':>14}")
    lines = [head]
    for r in rows:
        ratio = r["bytes_sent_counted"] / r["bytes_model"] if r["bytes_model"] else float("nan")
        lines.append(
            f"{r['world_size']:>5}{r['skew']:>6g}{r['step_ms']:>9.1f}{r['cpu_ms_max']:>11.1f}"
            f"{r['cpu_ms_mean']:>7.1f}{r['load_max_over_mean']:>14.2f}"
            f"{kib(r['bytes_sent_counted']):>10}{kib(r['bytes_sent_wire_fwd']):>9}"
            f"{kib(r['bytes_model']):>8}{ratio:>14.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.parallel --help``)."""
    p = argparse.ArgumentParser(prog="python -m moe_lib.bench.parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds a rank)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=None,
                   help="default: 1 2 4 (gloo), the visible GPUs up to 8 (nccl)")
    p.add_argument("--skews", type=float, nargs="+", default=[0.0, 4.0])
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: nccl with 2+ GPUs, else gloo")
    p.add_argument("--start-method", choices=START_METHODS, default="spawn")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override settings, e.g. --set tokens=4096 dtype=bfloat16")
    p.add_argument("--out", default=None, help="also write the rows and per-rank records here")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count()
    backend = args.backend or ("nccl" if gpus >= 2 else "gloo")
    world_sizes = args.world_sizes or ([n for n in (1, 2, 4, 8) if n <= gpus]
                                       if backend == "nccl" else [1, 2, 4])
    try:
        overrides = cli.parse_overrides(args.set, ParallelSettings, strings=True)
        s = replace(QUICK if args.quick else FULL, **overrides)
        if backend == "nccl" and max(world_sizes) > gpus:
            raise ValueError(f"--backend nccl needs one GPU per rank; {gpus} visible")
    except (TypeError, ValueError) as err:
        p.error(str(err))
    start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, raw = run(s, world_sizes, args.skews, backend, args.start_method, args.timeout)
    elapsed = time.perf_counter() - start
    device = "cuda" if backend == "nccl" else "cpu"
    print(f"backend={backend}, {s.tokens} tokens per rank, d_model={s.d_model}, "
          f"d_hidden={s.d_hidden}, E={s.num_experts}, k={s.top_k}, {s.dtype}; step = forward + "
          f"backward, median of {s.steps} steps of the slowest rank; bytes per rank and "
          f"forward pass; {os.cpu_count()} CPUs, {elapsed:.0f} s")
    print(format_table(rows))
    if args.out:
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        with cpu_threads(1):  # the machine as the ranks saw it: one thread each
            machine = machine_record(device)
        meta = {**machine, "settings": s.to_dict(), "seconds": elapsed,
                "backend": backend, "start_method": args.start_method,
                "threads_per_rank": 1, "load_average": [load0, load1],
                "world_sizes": world_sizes, "skews": args.skews}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "ranks": raw}, f, indent=1)
    print(json.dumps({"rows": [{k: r[k] for k in ("world_size", "skew", "step_ms",
                                                   "bytes_sent_counted", "bytes_model")}
                               for r in rows]}))


if __name__ == "__main__":
    main()
