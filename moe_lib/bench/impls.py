"""The implementations the dispatch benchmark times, by name: a registry of builders.

An MoE layer with E SwiGLU experts of hidden h and top-k routing does the GEMM FLOPs of a dense
SwiGLU FFN of hidden k*h. The registered implementations, in the order of :data:`IMPLS`:

- ``dense bound``: ``FeedForward(d, k*h, "swiglu")``, the same FLOPs without routing;
- ``dense (nn.Linear)``: the same FFN as three ``nn.Linear`` (the layout of Mixtral's experts in
  transformers), a second dense reference;
- ``dense gating``: ``MoE(router="dense")``, every expert on every token (E/k times the FLOPs);
- ``mask loop``, ``index_add (HF)`` and ``module loop``: the baselines of
  :mod:`moe_lib.bench.baselines` (the tutorial mask loop; Hugging Face's one-hot index_add loop;
  separate per-expert ``nn.Linear`` modules in a plain index_add loop);
- ``moe_lib loop`` and ``moe_lib sorted``: ``MoE(dispatch="loop" | "sorted")``;
- ``sorted+grouped_mm``: the sorted path with ``torch._grouped_mm`` for the expert GEMMs;
- ``sorted+compile``: ``torch.compile`` of the sorted path (built only when asked for:
  compiling takes minutes on 2 CPU cores).

A builder is registered with ``@register(name)`` and receives a :class:`Context` (the size and
the reference layer, ``moe_lib sorted``, whose router and expert weights every top-k
implementation shares); it returns a :class:`Built` ``(module, fn, note)``. Adding an
implementation to the benchmark is one decorated function::

    @register("sorted, capacity 1.0", compare=False)
    def _capacity(ctx):
        m = ctx.twin(dispatch="sorted", capacity_factor=1.0)
        return Built(m, layer_fn(m))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_lib.bench.baselines import (
    GroupedMMBank,
    IndexAddMoE,
    LinearSwiGLU,
    MaskLoopMoE,
    ModuleLoopMoE,
)
from moe_lib.bench.timing import Impl, StepFn
from moe_lib.checks import (
    check_bool,
    check_int,
    check_int_range,
    check_positive_int,
    check_tensor,
    check_type,
)
from moe_lib.experts import FeedForward
from moe_lib.layer import MoE
from moe_lib.runtime import as_device

REFERENCE = "moe_lib sorted"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class Context:
    """What a builder gets: the size, the seed, whether to compile, and the reference layer
    (``MoE(d, h, E, k, expert="swiglu", router="topk", dispatch="sorted")``, built first with
    ``torch.manual_seed(seed)``)."""

    d: int
    h: int
    E: int
    k: int
    seed: int
    compile: bool
    reference: MoE

    def __post_init__(self) -> None:
        check_size("", self.d, self.h, self.E, self.k)
        check_int("seed", self.seed, low=0, high=2**32 - 1)
        check_bool("compile", self.compile)
        check_type("reference", self.reference, MoE)
        c = self.reference.config
        if (c.d_model, c.d_hidden, c.num_experts, c.top_k) != (self.d, self.h, self.E, self.k):
            raise ValueError(f"reference must be an MoE of d={self.d}, h={self.h}, E={self.E}, "
                             f"k={self.k}, got {c.d_model}, {c.d_hidden}, {c.num_experts}, "
                             f"{c.top_k}")

    def twin(self, **kwargs: object) -> MoE:
        """A SwiGLU ``MoE(d, h, E, k, **kwargs)`` with the reference's router and expert weights."""
        m = MoE(self.d, self.h, self.E, self.k, expert="swiglu", **kwargs)
        m.load_state_dict(self.reference.state_dict(), strict=False)
        return m


class Built(NamedTuple):
    """A builder's result: the module (moved to the device and dtype by :func:`build_impls`),
    ``fn: x -> y`` (None when it cannot run here) and a note for the table."""

    module: nn.Module
    fn: StepFn | None
    note: str = ""


Builder = Callable[[Context], Built]


@dataclass(frozen=True)
class Entry:
    """A registered implementation.

    ``slow``: the timing stops it after ``min_rounds`` once the budget is spent.
    ``compare``: its output must equal the reference's (False for the dense FFN and dense
    gating, which compute something else). ``compiles``: its first call compiles, so it is
    checked on the full input (compiled once, for the timed shape) and its memory measured after
    the timing. ``bound``: the implementation its ratios are taken to (its FLOP-matched dense
    FFN).
    """

    name: str
    build: Builder
    slow: bool = False
    compare: bool = True
    compiles: bool = False
    bound: str = "dense bound"


REGISTRY: dict[str, Entry] = {}


def register(name: str, slow: bool = False, compare: bool = True,
             compiles: bool = False, bound: str = "dense bound") -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(ctx) -> Built`` under ``name`` (see :class:`Entry`)."""
    check_type("name", name, str)
    if not name.strip():
        raise ValueError("name must be a non-empty string")
    if name in REGISTRY:
        raise ValueError(f"name {name!r} is already registered; registered: {tuple(REGISTRY)}")
    check_bool("slow", slow)
    check_bool("compare", compare)
    check_bool("compiles", compiles)
    check_type("bound", bound, str)

    def decorate(builder: Builder) -> Builder:
        if not callable(builder):
            raise TypeError(f"builder must be callable, ctx -> Built, got "
                            f"{type(builder).__name__}")
        REGISTRY[name] = Entry(name, builder, slow, compare, compiles, bound)
        return builder

    return decorate


def layer_fn(m: MoE) -> StepFn:
    """``x -> m(x).y``: the output tensor of an MoE layer."""
    check_type("m", m, MoE)
    return lambda x: m(x).y


@register("dense bound", compare=False)
def _dense_bound(ctx: Context) -> Built:
    mod = FeedForward(ctx.d, ctx.k * ctx.h, "swiglu")
    return Built(mod, mod)


@register("dense (nn.Linear)", compare=False)
def _dense_linear(ctx: Context) -> Built:
    mod = LinearSwiGLU(ctx.d, ctx.k * ctx.h)
    return Built(mod, mod, "three nn.Linear")


@register("dense gating", slow=True, compare=False)
def _dense_gating(ctx: Context) -> Built:
    torch.manual_seed(ctx.seed)
    mod = MoE(ctx.d, ctx.h, ctx.E, expert="swiglu", router="dense")  # top_k: all E
    return Built(mod, layer_fn(mod), f"E/k = {ctx.E / ctx.k:g} times the expert FLOPs")


@register("mask loop", slow=True)
def _mask_loop(ctx: Context) -> Built:
    mod = MaskLoopMoE(ctx.reference)
    return Built(mod, mod)


@register("index_add (HF)", slow=True)
def _index_add(ctx: Context) -> Built:
    mod = IndexAddMoE(ctx.reference)
    return Built(mod, mod)


@register("module loop")
def _module_loop(ctx: Context) -> Built:
    mod = ModuleLoopMoE(ctx.reference)
    return Built(mod, mod, "nn.Linear experts, index_add_")


@register("moe_lib loop", slow=True)
def _moe_loop(ctx: Context) -> Built:
    mod = ctx.twin(dispatch="loop")
    return Built(mod, layer_fn(mod))


@register(REFERENCE)
def _moe_sorted(ctx: Context) -> Built:
    return Built(ctx.reference, layer_fn(ctx.reference))


@register("sorted+grouped_mm")
def _sorted_grouped_mm(ctx: Context) -> Built:
    mod = ctx.twin(dispatch="sorted")
    mod.experts = GroupedMMBank(ctx.E, ctx.d, ctx.h, "swiglu")
    mod.experts.load_state_dict(ctx.reference.experts.state_dict())
    if not hasattr(torch, "_grouped_mm"):
        return Built(mod, None, "torch._grouped_mm is missing in this torch")
    return Built(mod, layer_fn(mod))


@register("sorted+compile", compiles=True)
def _sorted_compile(ctx: Context) -> Built:
    mod = ctx.twin(dispatch="sorted")
    if not ctx.compile:
        return Built(mod, None, "not run: pass --compile (compiling takes minutes)")
    return Built(mod, torch.compile(layer_fn(mod)))


IMPLS = tuple(REGISTRY)  # the layers of one top-k size, in the order of the tables


def deepseek_options(E: int, k: int) -> dict:
    """A DeepSeek-V3-style layer at any size: sigmoid scores, group-limited selection (8 or 4
    groups, half of them kept, when E allows), a selection bias, routed scaling 2.5, and one
    ungated shared expert of the routed experts' width."""
    options = dict(score="sigmoid", selection_bias=True, routed_scaling_factor=2.5, n_shared=1)
    for n_group in (8, 4):
        if E % n_group == 0 and (n_group // 2) * (E // n_group) >= k:
            options.update(n_group=n_group, topk_group=n_group // 2)
            break
    return options


DEEPSEEK_BOUND = "deepseek dense bound"


@register(DEEPSEEK_BOUND, compare=False, bound=DEEPSEEK_BOUND)
def _deepseek_bound(ctx: Context) -> Built:
    mod = FeedForward(ctx.d, (ctx.k + 1) * ctx.h, "swiglu")  # k routed + 1 shared expert
    return Built(mod, mod)


@register("deepseek-style sorted", compare=False, bound=DEEPSEEK_BOUND)
def _deepseek_sorted(ctx: Context) -> Built:
    torch.manual_seed(ctx.seed)
    mod = MoE(ctx.d, ctx.h, ctx.E, ctx.k, expert="swiglu", dispatch="sorted",
              **deepseek_options(ctx.E, ctx.k))
    return Built(mod, layer_fn(mod), "sigmoid, groups, bias, scale 2.5, 1 shared")


@register("deepseek-style loop", slow=True, compare=False, bound=DEEPSEEK_BOUND)
def _deepseek_loop(ctx: Context) -> Built:
    torch.manual_seed(ctx.seed)
    mod = MoE(ctx.d, ctx.h, ctx.E, ctx.k, expert="swiglu", dispatch="loop",
              **deepseek_options(ctx.E, ctx.k))
    return Built(mod, layer_fn(mod))


SLOW = tuple(n for n, e in REGISTRY.items() if e.slow)


def check_names(name: str, names: object) -> tuple[str, ...]:
    """``names`` as a tuple of registered, distinct implementation names (else raise)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{name} must be a list of implementation names, got "
                        f"{type(names).__name__} {names!r}")
    if not names:
        raise ValueError(f"{name} must name at least one implementation of {tuple(REGISTRY)}")
    for n in names:
        check_type(f"{name}[...]", n, str)
        if n not in REGISTRY:
            raise ValueError(f"{name} holds the unknown implementation {n!r}; choose from "
                             f"{tuple(REGISTRY)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must not repeat an implementation, got {list(names)}")
    return tuple(names)


def check_dtype(name: str, dtype: object) -> None:
    """Raise unless ``dtype`` is one of the floating dtypes the benchmark runs in."""
    check_type(name, dtype, torch.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"{name} must be one of {DTYPES}, got {dtype}")


def check_size(name: str, d: object, h: object, E: object, k: object) -> None:
    """Raise unless d, h, E are ints >= 1 and k is an int in [1, E] (names prefixed by ``name``)."""
    check_positive_int(f"{name}d", d)
    check_positive_int(f"{name}h", h)
    check_positive_int(f"{name}E", E)
    check_int_range(f"{name}k", k, 1, E)


def build_impls(d: int, h: int, E: int, k: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, names: Sequence[str] = IMPLS,
                compile_fast: bool = False, seed: int = 0) -> dict[str, Impl]:
    """The implementations ``names`` at one size, sharing the router and expert weights of one
    reference layer, on ``device`` in ``dtype``.

    The reference is built first after ``torch.manual_seed(seed)``, then each builder runs in
    the order of ``names`` (so the weights of the dense bound depend on that order, as always).
    """
    check_size("", d, h, E, k)
    device = as_device(device)
    check_dtype("dtype", dtype)
    names = check_names("names", names)
    check_bool("compile_fast", compile_fast)
    check_int("seed", seed, low=0, high=2**32 - 1)

    torch.manual_seed(seed)
    reference = MoE(d, h, E, k, expert="swiglu", router="topk", dispatch="sorted")
    ctx = Context(d, h, E, k, seed, compile_fast, reference)
    out: dict[str, Impl] = {}
    for name in names:
        built = REGISTRY[name].build(ctx)
        if not isinstance(built, Built) or not isinstance(built.module, nn.Module):
            raise TypeError(f"the builder of {name!r} must return a Built(module, fn, note) "
                            f"with an nn.Module, got {built!r:.80}")
        built.module.to(device=device, dtype=dtype)
        out[name] = Impl(name, built.fn, list(built.module.parameters()), built.note)
    return out


def check_outputs(impls: dict[str, Impl], x: Tensor, n_check: int = 256) -> dict[str, str]:
    """Run every comparable implementation on the first ``n_check`` tokens of ``x`` and compare.

    The reference is ``moe_lib sorted``; float32/float64 outputs must agree to 1e-4 (lower
    precisions only need to run: a bfloat16 router may break near-ties differently).
    Implementations that compile run on all of ``x``, so that they compile once, for the timed
    shape. Returns ``{name: note}`` for the implementations that failed to run (they are then
    skipped); a wrong output raises an AssertionError naming the implementation.
    """
    check_type("impls", impls, dict)
    for name, impl in impls.items():
        check_type(f"impls[{name!r}]", impl, Impl)
    check_tensor("x", x, dims=2, kind="float")
    check_positive_int("n_check", n_check)
    failed: dict[str, str] = {}
    exact = x.dtype in (torch.float32, torch.float64)
    ref_small = ref_full = None
    ref = impls.get(REFERENCE)
    if ref is not None:
        ref_small = ref.fn(x[:n_check]).detach()
    for name, impl in impls.items():
        entry = REGISTRY.get(name)
        if impl.fn is None or name == REFERENCE or (entry is not None and not entry.compare):
            continue
        full = entry is not None and entry.compiles
        try:
            y = impl.fn(x if full else x[:n_check]).detach()
        except Exception as err:  # noqa: BLE001 - report any failure as "n/a"
            first_line = (str(err).splitlines() or [""])[0]
            failed[name] = f"{type(err).__name__}: {first_line[:80]}"
            continue
        if full and ref_full is None and ref is not None:
            ref_full = ref.fn(x).detach()
        expected = ref_full if full else ref_small
        if exact and expected is not None:
            torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4, msg=name)
    return failed
