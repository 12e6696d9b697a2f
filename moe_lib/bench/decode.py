"""Decode benchmark: an MoE layer at the batch sizes of decoding, against dense FFNs and against
the bound set by the bytes it must read and the FLOPs it must do.

At each size ``(d, h, E, k)`` and batch ``B`` (tokens decoded together), in eval mode under
``torch.no_grad()``, float32, one CPU thread by default:

- ``moe <dispatch>``: ``MoE(d, h, E, k, expert="swiglu", dispatch=<dispatch>)`` for each dispatch
  asked for (default: every dispatch of :mod:`moe_lib.dispatch` but "dense"), all sharing one
  set of router and expert weights;
- ``dense_active``: ``FeedForward(d, k*h)``, the same expert parameters per token;
- ``dense_total``: ``FeedForward(d, E*h)``, the same parameters in all.

**The bound** of a row is a lower bound on its time, from the two rates measured in the same run
(the probes are timed in the same interleaved rounds as the layers)::

    t_bound = max(bytes / BW, flops / R)

- bytes (float32 weights the call must read, 4 bytes each): ``moe``: ``4 (d E + n_touched * 3 d
  h)`` with ``n_touched`` the distinct experts the router actually chose for the B tokens (under
  uniform routing ``E (1 - (1 - k/E)^B)`` on average); ``dense_active``: ``4 * 3 d k h``;
  ``dense_total``: ``4 * 3 d E h``. Activations (``B d`` numbers in and out) are left out.
- flops: ``2 B (d E + k 3 d h)`` (router and k experts per token), ``2 B 3 d k h``, ``2 B 3 d E h``.
- BW: the read bandwidth of the layers' own kernel, a matrix-vector product ``v @ P`` with
  ``v: [1, 1024]`` and the probe ``P: [1024, n]``, a float32 buffer of ``probe_mib`` MiB far
  larger than the caches: bytes / median time. (A plain ``sum`` over the same buffer reads it
  about 20% slower on the machines we tried, so a bound from it is no lower bound: a large
  dense FFN at batch 1 ran faster than it.)
- R: the rate of a ``[g, g] @ [g, g]`` GEMM (``g = gemm_dim``): ``2 g^3`` / median time.

**Cold weights, warm code.** Before every timed call the probe buffer is read once (that pass
is the bandwidth sample), which evicts the weights from the caches: every call reads its weights
from memory, as each layer of a decode step does when a model is far larger than the caches.
That pass also evicts the code and the interpreter's data, which in a model stay warm (the
previous layer ran the same code a moment before); so right after it a small twin of the
implementation (``d = h = 16``, the same E, k and batch) runs once, untimed. Each round runs
every implementation once, in an order that rotates from round to round; results are medians.
``clock="process"`` (the default, with one thread) counts the CPU time of this process: time
stalled on memory counts, time spent waiting for a core while other programs run does not.

    python -m moe_lib.bench.decode                     # default sizes and batches
    python -m moe_lib.bench.decode --sizes 512,1024,8,2 --batches 1,8 --rounds 9
    python -m moe_lib.bench.decode --out decode.json   # also write rows and machine as JSON

It prints a table per size, then one line of JSON (the summary: for each size, the MoE rows'
ratios to their bound and to ``dense_active``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from moe_lib.bench import cli
from moe_lib.bench.machine import machine_record
from moe_lib.bench.timing import CLOCKS, get_clock, load_average
from moe_lib.checks import (
    check_choice,
    check_int,
    check_int_range,
    check_positive_int,
    check_type,
)
from moe_lib.dispatch import DISPATCH_KINDS
from moe_lib.experts import FeedForward
from moe_lib.inference import expected_touched
from moe_lib.layer import MoE
from moe_lib.runtime import cpu_threads

__all__ = [
    "DEFAULT_BATCHES", "DEFAULT_SIZES", "DecodeBenchConfig", "decode_bound", "expected_touched",
    "format_table", "main", "parse_ints", "parse_sizes", "run_decode", "summary",
]

Size = tuple[int, int, int, int]  # (d_model, d_hidden, experts, k)

DEFAULT_SIZES: tuple[Size, ...] = ((512, 1024, 8, 2), (256, 512, 32, 4))
DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 8, 64, 512)
BYTES_PER_VALUE = 4  # float32
PROBE_ROWS = 1024  # the bandwidth probe is a [PROBE_ROWS, n] matrix read by a matrix-vector product


def decode_bound(nbytes: float, flops: float, bandwidth: float, rate: float) -> float:
    """``max(nbytes / bandwidth, flops / rate)`` in seconds (bandwidth in bytes/s, rate in
    FLOP/s, both > 0)."""
    for name, v in (("nbytes", nbytes), ("flops", flops)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    for name, v in (("bandwidth", bandwidth), ("rate", rate)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")
    return max(nbytes / bandwidth, flops / rate)


def _check_sizes(sizes: object) -> tuple[Size, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or (
            sizes and not isinstance(sizes[0], (tuple, list))):
        raise TypeError(f"sizes must be a list of (d, h, E, k) tuples, got "
                        f"{type(sizes).__name__} {sizes!r:.80}")
    if not sizes:
        raise ValueError("sizes must hold at least one (d, h, E, k) tuple, got none")
    out = []
    for i, size in enumerate(sizes):
        if not isinstance(size, (tuple, list)) or len(size) != 4:
            raise ValueError(f"sizes[{i}] must be a (d, h, E, k) tuple of 4 ints, got {size!r}")
        d, h, E, k = size
        for name, v in (("d", d), ("h", h), ("E", E)):
            check_positive_int(f"sizes[{i}].{name}", v)
        check_int_range(f"sizes[{i}].k", k, 1, E)
        out.append((d, h, E, k))
    return tuple(out)


def _check_batches(batches: object) -> tuple[int, ...]:
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
        raise TypeError(f"batches must be a list of ints >= 1, got {type(batches).__name__}")
    if not batches:
        raise ValueError("batches must hold at least one batch size, got none")
    for i, b in enumerate(batches):
        check_positive_int(f"batches[{i}]", b)
    if len(set(batches)) != len(batches):
        raise ValueError(f"batches must not repeat a batch size, got {list(batches)}")
    return tuple(batches)


def _default_dispatches() -> tuple[str, ...]:
    return tuple(kind for kind in DISPATCH_KINDS if kind != "dense")


@dataclass(frozen=True)
class DecodeBenchConfig:
    """One decode benchmark run, checked when made (before any work).

    Args:
        sizes: ``(d_model, d_hidden, experts, k)`` tuples, 1 <= k <= experts.
        batches: batch sizes (tokens per call), distinct ints >= 1.
        dispatches: the MoE dispatches to time (names of :data:`moe_lib.dispatch.DISPATCH_KINDS`;
            None: all but "dense").
        rounds: timed rounds (>= 1), after one untimed warm-up call of each implementation.
        threads: CPU threads while timing (>= 1).
        clock: "process" (CPU time of this process; needs threads=1) or "wall".
        probe_mib: MiB of the bandwidth probe, which also evicts the caches (>= 1; use several
            times the last-level cache).
        gemm_dim: g of the ``[g, g] @ [g, g]`` GEMM that measures the FLOP rate (>= 1).
        seed: seeds the weights (``torch.manual_seed``) and the inputs.
        progress: print each size and batch as it starts.
    """

    sizes: Sequence[Size] = DEFAULT_SIZES
    batches: Sequence[int] = DEFAULT_BATCHES
    dispatches: Sequence[str] | None = None
    rounds: int = 15
    threads: int = 1
    clock: str = "process"
    probe_mib: int = 256
    gemm_dim: int = 1024
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", _check_sizes(self.sizes))
        object.__setattr__(self, "batches", _check_batches(self.batches))
        dispatches = _default_dispatches() if self.dispatches is None else self.dispatches
        if isinstance(dispatches, str) or not isinstance(dispatches, Sequence) or not dispatches:
            raise TypeError(f"dispatches must be a non-empty list of dispatch names from "
                            f"{DISPATCH_KINDS}, got {dispatches!r}")
        for i, kind in enumerate(dispatches):
            check_choice(f"dispatches[{i}]", kind, DISPATCH_KINDS)
        if len(set(dispatches)) != len(dispatches):
            raise ValueError(f"dispatches must not repeat a name, got {list(dispatches)}")
        object.__setattr__(self, "dispatches", tuple(dispatches))
        check_positive_int("rounds", self.rounds)
        check_positive_int("threads", self.threads)
        check_choice("clock", self.clock, CLOCKS)
        if self.clock == "process" and self.threads != 1:
            raise ValueError(f"clock='process' measures work only with threads=1, got "
                             f"threads={self.threads}")
        check_positive_int("probe_mib", self.probe_mib)
        check_positive_int("gemm_dim", self.gemm_dim)
        check_int("seed", self.seed, low=0, high=2**32 - 1)
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True or False, got {self.progress!r}")

    def to_dict(self) -> dict:
        """The settings as a dict (what ``--out`` files record under ``meta.settings``)."""
        def plain(v: object) -> object:
            return [plain(u) for u in v] if isinstance(v, (tuple, list)) else v

        return {k: plain(v) for k, v in asdict(self).items()}


TWIN = 16  # d_model and d_hidden of the twins that re-warm the code before a timed call


@dataclass
class _Impl:
    name: str
    fn: object  # x -> y
    nbytes_fixed: int  # weights read whatever the routing (dense: all; MoE: the router)
    per_expert_bytes: int  # MoE: bytes of one expert (0 for dense)
    flops_per_token: int
    twin: object  # the same implementation at d = h = TWIN: x [B, TWIN] -> y


def _build(d: int, h: int, E: int, k: int, dispatches: Sequence[str], seed: int
           ) -> tuple[MoE, dict[str, _Impl]]:
    """The implementations of one size, MoE layers sharing the weights of the first."""
    torch.manual_seed(seed)
    base = MoE(d, h, E, k, expert="swiglu", dispatch=dispatches[0]).eval()
    impls: dict[str, _Impl] = {}
    router_params = sum(p.numel() for p in base.router.parameters())
    per_expert = base.experts.params_per_expert()
    for kind in dispatches:
        layer = base if kind == dispatches[0] else MoE(d, h, E, k, expert="swiglu",
                                                       dispatch=kind).eval()
        layer.router, layer.experts = base.router, base.experts  # the same weights, not a copy
        twin = MoE(TWIN, TWIN, E, k, expert="swiglu", dispatch=kind).eval()
        impls[f"moe {kind}"] = _Impl(f"moe {kind}", lambda x, m=layer: m(x).y,
                                     BYTES_PER_VALUE * router_params,
                                     BYTES_PER_VALUE * per_expert,
                                     2 * (router_params + k * per_expert),
                                     lambda x, m=twin: m(x).y)
    for name, hidden in (("dense_active", k * h), ("dense_total", E * h)):
        ffn = FeedForward(d, hidden, "swiglu").eval()
        params = sum(p.numel() for p in ffn.parameters())
        impls[name] = _Impl(name, ffn, BYTES_PER_VALUE * params, 0, 2 * params,
                            FeedForward(TWIN, TWIN, "swiglu").eval())
    return base, impls


def _median(values: list[float]) -> float:
    return statistics.median(values)


def run_decode(config: DecodeBenchConfig) -> list[dict]:
    """Time every implementation at every size and batch of ``config``; one row dict each.

    Row keys: d, h, E, k, B, impl, ms (median), bound_ms, x_bound (ms / bound_ms), x_active
    (ms / dense_active's ms at the same size and batch), nbytes, flops, touched (distinct
    experts the router chose; None for the dense rows), expected_touched (uniform routing),
    gbs (nbytes / time, GB/s), bandwidth_gbs and gemm_gflops (the probes of that size, which
    every row of the size shares), rounds.
    """
    check_type("config", config, DecodeBenchConfig)
    c = config
    with cpu_threads(c.threads), torch.no_grad():
        now = get_clock(c.clock, "cpu")
        probe = torch.ones(PROBE_ROWS, c.probe_mib * 2**20 // (BYTES_PER_VALUE * PROBE_ROWS))
        g = c.gemm_dim
        ga, gb = torch.randn(g, g), torch.randn(g, g)
        rows: list[dict] = []
        for size in c.sizes:
            rows += _run_size(c, size, probe, ga, gb, now)
        return rows


def _run_size(c: DecodeBenchConfig, size: Size, probe, ga, gb, now) -> list[dict]:
    d, h, E, k = size
    base, impls = _build(d, h, E, k, c.dispatches, c.seed)
    names = list(impls)
    bw_samples: list[float] = []
    gemm_samples: list[float] = []
    out: list[dict] = []
    gen = torch.Generator().manual_seed(c.seed + 1)
    probe_x = probe.new_ones(1, probe.shape[0])  # [1, PROBE_ROWS]
    for B in c.batches:
        if c.progress:
            print(f"size d={d} h={h} E={E} k={k}, batch {B}", flush=True)
        x = torch.randn(B, d, generator=gen)
        x_twin = torch.randn(B, TWIN)
        ids = base.router(x).expert_ids
        touched = int(torch.unique(ids).numel())
        for n in names:  # warm-up: first calls allocate
            impls[n].fn(x)
            impls[n].twin(x_twin)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(c.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            t0 = now()
            ga @ gb
            gemm_samples.append(now() - t0)
            for n in order:
                t0 = now()
                torch.mm(probe_x, probe)  # evicts the weights from the caches; a bandwidth sample
                bw_samples.append(now() - t0)
                impls[n].twin(x_twin)  # the code warm again, the weights still cold
                t1 = now()
                impls[n].fn(x)
                times[n].append(now() - t1)
        for n in names:
            impl = impls[n]
            is_moe = impl.per_expert_bytes > 0
            nbytes = impl.nbytes_fixed + (touched * impl.per_expert_bytes if is_moe else 0)
            out.append(dict(d=d, h=h, E=E, k=k, B=B, impl=n, ms=1e3 * _median(times[n]),
                            nbytes=nbytes, flops=B * impl.flops_per_token,
                            touched=touched if is_moe else None,
                            expected_touched=expected_touched(E, k, B) if is_moe else None,
                            rounds=len(times[n])))
    bandwidth = probe.numel() * BYTES_PER_VALUE / _median(bw_samples)
    rate = 2 * ga.shape[0] ** 3 / _median(gemm_samples)
    for row in out:
        bound = decode_bound(row["nbytes"], row["flops"], bandwidth, rate)
        row.update(bound_ms=1e3 * bound, x_bound=row["ms"] / (1e3 * bound),
                   gbs=row["nbytes"] / (row["ms"] / 1e3) / 1e9,
                   bandwidth_gbs=bandwidth / 1e9, gemm_gflops=rate / 1e9)
    active = {r["B"]: r["ms"] for r in out if r["impl"] == "dense_active"}
    for row in out:
        row["x_active"] = row["ms"] / active[row["B"]]
    return out


_ROW_KEYS = ("d", "h", "E", "k", "B", "impl", "ms", "bound_ms", "x_bound", "x_active")


def _check_rows(rows: object) -> None:
    check_type("rows", rows, list)
    for i, r in enumerate(rows):
        check_type(f"rows[{i}]", r, dict)
        missing = [key for key in _ROW_KEYS if key not in r]
        if missing:
            raise ValueError(f"rows[{i}] must be a row of run_decode, misses {missing}")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`run_decode`'s rows, one block per size."""
    _check_rows(rows)
    head = (f"{'batch':>6} {'implementation':<14}{'ms':>9}{'bound ms':>10}{'x bound':>9}"
            f"{'x dense_active':>15}{'MB read':>9}{'GB/s':>7}{'experts':>9}{'uniform':>9}")
    lines: list[str] = []
    key = None
    for r in rows:
        size = (r["d"], r["h"], r["E"], r["k"])
        if size != key:
            key = size
            lines += ["", "d_model={} d_hidden={} experts={} k={}".format(*size) +
                      f"   (bandwidth {r.get('bandwidth_gbs', float('nan')):.1f} GB/s, GEMM "
                      f"{r.get('gemm_gflops', float('nan')):.0f} GFLOP/s, measured in the run)",
                      head, "-" * len(head)]
        touched = "" if r.get("touched") is None else str(r["touched"])
        expected = "" if r.get("expected_touched") is None else f"{r['expected_touched']:.2f}"
        lines.append(f"{r['B']:>6} {r['impl']:<14}{r['ms']:>9.3f}{r['bound_ms']:>10.3f}"
                     f"{r['x_bound']:>9.2f}{r['x_active']:>15.2f}"
                     f"{r.get('nbytes', 0) / 1e6:>9.1f}{r.get('gbs', float('nan')):>7.1f}"
                     f"{touched:>9}{expected:>9}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """The last-line JSON: for each size ``"d,h,E,k"``, the probes and, for each MoE row,
    ``{B: [x_bound, x_active]}``."""
    _check_rows(rows)
    out: dict = {}
    for r in rows:
        key = "{},{},{},{}".format(r["d"], r["h"], r["E"], r["k"])
        entry = out.setdefault(key, {"bandwidth_gbs": r.get("bandwidth_gbs"),
                                     "gemm_gflops": r.get("gemm_gflops")})
        if r["impl"].startswith("moe"):
            entry.setdefault(r["impl"], {})[str(r["B"])] = [round(r["x_bound"], 3),
                                                             round(r["x_active"], 3)]
    return out


def parse_sizes(text: str) -> list[Size]:
    """``"d,h,E,k;d,h,E,k"`` -> list of 4-tuples (an ``argparse.ArgumentTypeError`` if
    malformed)."""
    return cli.parse_size_list(text, "d,h,E,k")


def parse_ints(text: str) -> list[int]:
    """``"1,2,8"`` -> ``[1, 2, 8]`` (an ``argparse.ArgumentTypeError`` if malformed)."""
    check_type("text", text, str)
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from err


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.decode --help``)."""
    p = argparse.ArgumentParser(prog="python -m moe_lib.bench.decode",
                                description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help='"d,h,E,k;..." (default: ' + "; ".join(
                       ",".join(map(str, s)) for s in DEFAULT_SIZES) + ")")
    p.add_argument("--batches", type=parse_ints, default=None,
                   help="comma-separated batch sizes (default: "
                        + ",".join(map(str, DEFAULT_BATCHES)) + ")")
    p.add_argument("--dispatches", default=None,
                   help="comma-separated MoE dispatches (default: all but dense: "
                        + ",".join(_default_dispatches()) + ")")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=list(CLOCKS), default=None,
                   help="default: process with one thread, else wall")
    p.add_argument("--probe-mib", type=int, default=256)
    p.add_argument("--gemm-dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows and the machine as JSON")
    args = p.parse_args(argv)
    clock = args.clock or ("process" if args.threads == 1 else "wall")
    dispatches = None if args.dispatches is None else [s.strip() for s in
                                                        args.dispatches.split(",")]
    try:
        config = DecodeBenchConfig(
            sizes=args.sizes or DEFAULT_SIZES, batches=args.batches or DEFAULT_BATCHES,
            dispatches=dispatches, rounds=args.rounds, threads=args.threads, clock=clock,
            probe_mib=args.probe_mib, gemm_dim=args.gemm_dim, seed=args.seed, progress=True)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    load0 = load_average()
    start = time.perf_counter()
    rows = run_decode(config)
    seconds = time.perf_counter() - start
    with cpu_threads(config.threads):
        machine = machine_record("cpu")
    print(f"{machine['device']}; torch {torch.__version__}; clock={config.clock}; medians of "
          f"{config.rounds} interleaved rounds, caches evicted before every call; x bound: time "
          f"/ max(bytes / bandwidth, FLOPs / GEMM rate); 1-minute load average {load0} at the "
          f"start, {load_average()} at the end; {seconds:.0f} s")
    print(format_table(rows))
    result = summary(rows)
    if args.out:
        meta = {**machine, "settings": config.to_dict(), "seconds": seconds,
                "load_average": [load0, load_average()]}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "summary": result}, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
