"""Fine-grained and shared experts (DeepSeekMoE) on chapter 8's byte-level language model.

Chapter 8's MoE has E experts of hidden h and routes each token to k of them (8 and 2). A
*variant* splits every expert into m experts of hidden h/m and routes to m*k of them
(fine-grained expert segmentation, Dai et al. 2024), with or without one *shared* expert that
every token uses (shared expert isolation). As in DeepSeekMoE, the shared expert takes the place
of one routed expert in the active and in the total parameters:

- ``m``: m*E routed experts of hidden h/m, top m*k;
- ``m + shared``: m*E - 1 routed experts of hidden h/m, top m*k - 1, plus one shared expert of
  hidden h/m, ungated and added to the routed output.

Every variant thus holds ``3 d E h`` expert weights in all and uses ``3 d k h`` per token (a
SwiGLU expert of hidden h has 3 d h weights); only the router's ``d x (routed experts)`` matrix
grows with m. All variants weigh their experts by the raw softmax probability (DeepSeekMoE's
g_i = s_i for the chosen experts; a renormalised single expert, as in ``m=1 + shared``, would
always get weight 1 and the router no gradient from the task loss) and use the Switch balance
loss scaled to alpha = 1e-2 under uniform routing (coefficient alpha / top_k, DeepSeekMoE's
normalisation of f_i) plus the z-loss (1e-3).

Every variant sees the same batches for a given seed. After training, a fixed batch of
validation windows is routed once more to record, per layer, the share of each character class's
assignments per expert (for heatmaps) and the maximal violation of balance on it.

    python -m moe_lib.bench.fine_grained --quick --out fine_grained.json

The command prints one line per run, then, as its last line, a JSON summary (mean validation
loss per variant and the per-seed differences to the ``m=1`` variant). Needs the ``book``
extra (pandas, tqdm) for :mod:`moe_lib.train`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace

import torch

from moe_lib.bench import cli
from moe_lib.bench.moe_vs_dense import FULL as LM_FULL
from moe_lib.bench.moe_vs_dense import QUICK as LM_QUICK
from moe_lib.bench.moe_vs_dense import Settings
from moe_lib.checks import check_bool, check_int, check_tensor, check_type
from moe_lib.data import CHAR_CLASSES, char_classes, lm_batch, load_code_corpus
from moe_lib.models import Transformer, TransformerConfig, ffn_parameter_counts
from moe_lib.runtime import available_device
from moe_lib.stats import max_violation, utilisation_by_group
from moe_lib.train import evaluate, train

BALANCE_ALPHA = 1e-2  # Switch loss under uniform routing, whatever the number of slots
Z_LOSS_COEF = 1e-3
GRANULARITIES = (1, 2, 4)
PROBE_WINDOWS = 64  # validation windows routed after training for the class heatmaps
QUICK = replace(LM_QUICK, steps=1000)
FULL = LM_FULL


@dataclass(frozen=True)
class Variant:
    """Granularity ``m`` (each expert split into m experts of hidden h/m, routed to m*k) and
    ``shared`` (one shared expert of hidden h/m instead of one routed expert)."""

    m: int
    shared: bool = False

    def __post_init__(self) -> None:
        check_int("m", self.m, low=1)
        check_bool("shared", self.shared)

    @property
    def name(self) -> str:
        return f"m={self.m}" + (" + shared" if self.shared else "")

    def routed_experts(self, num_experts: int) -> int:
        """m E routed experts, one fewer with a shared expert."""
        return self.m * num_experts - int(self.shared)

    def routed_top_k(self, top_k: int) -> int:
        """m k routed experts per token, one fewer with a shared expert."""
        return self.m * top_k - int(self.shared)

    def expert_hidden(self, h: int) -> int:
        """h / m, the hidden width of every expert (routed and shared)."""
        return h // self.m


VARIANTS = tuple(Variant(m, shared) for m in GRANULARITIES for shared in (False, True))
BASELINE = Variant(1).name


def _check_variant(variant: object, settings: Settings, name: str = "variant") -> Variant:
    check_type(name, variant, Variant)
    if settings.h % variant.m:
        raise ValueError(f"{name}.m must divide the expert hidden width h={settings.h}, "
                         f"got m={variant.m}")
    if variant.routed_top_k(settings.top_k) < 1:
        raise ValueError(f"{name} leaves no routed expert per token (m*k - 1 = 0); "
                         "use top_k >= 2 or m >= 2 with a shared expert")
    return variant


def variant_config(settings: Settings, variant: Variant) -> TransformerConfig:
    """The language model of ``variant`` at ``settings`` (``num_experts`` E and ``top_k`` k of
    the settings are the coarse layer's; see the module docstring)."""
    check_type("settings", settings, Settings)
    v = _check_variant(variant, settings)
    s = settings
    top_k = v.routed_top_k(s.top_k)
    moe = {"num_experts": v.routed_experts(s.num_experts), "top_k": top_k, "expert": "swiglu",
           "weighting": "raw", "balance_loss": "switch", "balance_coef": BALANCE_ALPHA / top_k,
           "z_loss_coef": Z_LOSS_COEF}
    if v.shared:
        moe.update(n_shared=1, d_shared=v.expert_hidden(s.h))
    return TransformerConfig(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                             seq_len=s.seq_len, d_hidden=v.expert_hidden(s.h), task="lm",
                             moe=moe)


def _check_variants(variants: object, settings: Settings) -> list[Variant]:
    if not isinstance(variants, (list, tuple)):
        raise TypeError(f"variants must be a list of Variant, got {type(variants).__name__}")
    if not variants:
        raise ValueError("variants must hold at least one Variant, got none")
    out = [_check_variant(v, settings, f"variants[{i}]") for i, v in enumerate(variants)]
    if len({v.name for v in out}) != len(out):
        raise ValueError(f"variants must be distinct, got {[v.name for v in out]}")
    return out


@torch.no_grad()
def probe(model: Transformer, x: torch.Tensor) -> dict:
    """Route ``x: [B, S]`` (eval mode) and return, per MoE layer, the share of each character
    class's assignments per expert (``class_utilisation: [L][classes][E]``) and the maximal
    violation of balance (``max_violation: [L]``); ``class_share``: each class's share of x."""
    check_type("model", model, Transformer)
    check_tensor("x", x, dims=2, kind="int")
    model.eval()
    out = model(x.to(model.tok.weight.device))
    classes = char_classes(x).reshape(-1).to(x.device)
    nc = len(CHAR_CLASSES)
    util = [utilisation_by_group(r, classes.to(r.expert_ids.device), nc).cpu() for r in
            out.routings]
    share = torch.bincount(classes, minlength=nc).float() / classes.numel()
    return {"class_utilisation": [[[round(v, 5) for v in row] for row in u.tolist()]
                                  for u in util],
            "max_violation": [max_violation(r) for r in out.routings],
            "class_share": [round(v, 5) for v in share.tolist()]}


def run(settings: Settings, seeds: list[int], variants: tuple[Variant, ...] = VARIANTS,
        device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """Train every variant with every seed; one result dict per run (order: seed, variant).

    A result holds ``variant`` (its name), ``m``, ``shared``, ``seed``, ``val_loss`` (nats per
    byte on the fixed validation batches), ``active_params`` and ``total_params`` (FFN blocks,
    router included), ``routed_experts``, ``routed_top_k``, ``expert_hidden``, ``seconds``
    (training wall time), ``curve`` (validation loss during training) and ``probe`` (see
    :func:`probe`, on the same validation windows for every run).
    """
    check_type("settings", settings, Settings)
    seeds = cli.check_seeds(seeds)
    variants = _check_variants(variants, settings)
    device = available_device(device)
    check_bool("progress", progress)
    s = settings
    corpus = load_code_corpus(max_bytes=s.max_bytes)
    g = torch.Generator().manual_seed(1234)
    val = [lm_batch(corpus["val"], s.batch, s.seq_len, g) for _ in range(s.eval_batches)]
    probe_x, _ = lm_batch(corpus["val"], PROBE_WINDOWS, s.seq_len,
                          torch.Generator().manual_seed(4321))
    results = []
    for seed in seeds:
        for v in variants:
            torch.manual_seed(seed)
            model = Transformer(variant_config(s, v))
            data_gen = torch.Generator().manual_seed(seed)  # same batches for every variant

            def next_batch(step: int, gen: torch.Generator = data_gen) -> tuple:
                return lm_batch(corpus["train"], s.batch, s.seq_len, gen)

            res = train(model, next_batch, s.steps, lr=s.lr, eval_batches=val,
                        eval_every=max(1, s.steps // 5), device=device, seed=seed,
                        progress=progress, desc=f"{v.name} seed {seed}")
            counts = ffn_parameter_counts(model)
            results.append({
                "variant": v.name, "m": v.m, "shared": v.shared, "seed": seed,
                "val_loss": evaluate(model, val, device),
                "active_params": counts["active"], "total_params": counts["total"],
                "routed_experts": v.routed_experts(s.num_experts),
                "routed_top_k": v.routed_top_k(s.top_k), "expert_hidden": v.expert_hidden(s.h),
                "seconds": res.seconds,
                "curve": res.history.dropna(subset=["val_loss"])[["step", "val_loss"]]
                .to_dict("list"),
                "probe": probe(model, probe_x),
            })
    return results


_RUN_KEYS = ("variant", "seed", "val_loss", "active_params", "total_params", "seconds")


def _check_results(results: object) -> list[dict]:
    return cli.check_results(results, _RUN_KEYS, nonempty=True)


def paired_differences(results: list[dict], variant: str, baseline: str = BASELINE) -> list[float]:
    """Per seed, ``val_loss(variant) - val_loss(baseline)`` (negative: the variant is better),
    over the seeds that ran both, in seed order."""
    _check_results(results)
    check_type("variant", variant, str)
    check_type("baseline", baseline, str)
    by = {(r["variant"], r["seed"]): r["val_loss"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    pairs = [(by[(variant, s)], by[(baseline, s)]) for s in seeds
             if (variant, s) in by and (baseline, s) in by]
    if not pairs:
        raise ValueError(f"results must hold runs of {variant!r} and {baseline!r} with a "
                         "common seed")
    return [a - b for a, b in pairs]


def summary(results: list[dict]) -> dict:
    """The last-line JSON: ``val_loss`` (mean per variant), ``vs_baseline`` (per variant the
    mean and sample standard deviation of the per-seed differences to ``m=1``; std 0 for one
    seed), ``active_params`` and ``total_params`` per variant, ``seeds``."""
    _check_results(results)
    names = list(dict.fromkeys(r["variant"] for r in results))
    out: dict = {"val_loss": {}, "vs_baseline": {}, "active_params": {}, "total_params": {}}
    for name in names:
        rows = [r for r in results if r["variant"] == name]
        out["val_loss"][name] = statistics.fmean(r["val_loss"] for r in rows)
        out["active_params"][name] = rows[0]["active_params"]
        out["total_params"][name] = rows[0]["total_params"]
        if BASELINE in names and name != BASELINE:
            d = paired_differences(results, name)
            out["vs_baseline"][name] = {"mean": statistics.fmean(d),
                                        "std": statistics.stdev(d) if len(d) > 1 else 0.0}
    out["seeds"] = sorted({r["seed"] for r in results})
    return out


def format_runs(results: list[dict]) -> str:
    """One line per run: variant, seed, validation loss, FFN parameters, training seconds."""
    _check_results(results)
    lines = [f"{'variant':<16}{'seed':>5}{'val loss':>10}{'active':>10}{'total':>10}"
             f"{'time s':>9}"]
    for r in results:
        lines.append(f"{r['variant']:<16}{r['seed']:>5}{r['val_loss']:>10.4f}"
                     f"{r['active_params']:>10}{r['total_params']:>10}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def _parse_variants(names: list[str] | None) -> tuple[Variant, ...]:
    if names is None:
        return VARIANTS
    known = {v.name.replace(" ", ""): v for v in VARIANTS}
    out = []
    for name in names:
        key = name.replace(" ", "")
        if key not in known:
            raise ValueError(f"--variants takes names among {[v.name for v in VARIANTS]} "
                             f"(spaces optional), got {name!r}")
        out.append(known[key])
    return tuple(out)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.fine_grained --help``)."""
    p = cli.experiment_parser("fine_grained", __doc__, seeds=[0, 1, 2], settings_help=(
        "e.g. --set d_model=128 n_heads=8: fields of moe_vs_dense.Settings"))
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="variants to run, e.g. m=1 m=4+shared (default: all six)")
    args = p.parse_args(argv)
    s, seeds, device = cli.settings_from_args(p, args, QUICK, FULL)
    try:
        variants = _check_variants(_parse_variants(args.variants), s)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    clock = cli.Clock()
    results = run(s, seeds, tuple(variants), device, progress=not args.no_progress)
    print(format_runs(results))
    if args.out:
        cli.write_results(args.out, "fine_grained", argv, device, s, clock, results,
                          summary(results), variants=[v.name for v in variants],
                          balance_alpha=BALANCE_ALPHA, z_loss_coef=Z_LOSS_COEF,
                          probe_windows=PROBE_WINDOWS, char_classes=list(CHAR_CLASSES))
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
