"""Sparse upcycling of chapter 8's dense language model, against two ways of not upcycling.

Chapter 8's byte-level language model on the standard library's source, with a dense SwiGLU FFN
of hidden ``k h`` in each block (chapter 8's ``dense_active``), is trained for ``dense_steps``
steps. Then, for ``steps`` more steps on the same batches:

- ``dense``: the dense model, trained on;
- ``upcycled``: the dense model with every FFN turned into E experts that are copies of it and a
  new router (:func:`moe_lib.upcycle.upcycle_model`; top-k, renormalised weights, so the model
  computes exactly what the dense model computed when the phase starts), trained on;
- ``scratch``: the same MoE architecture from a random initialisation, trained for
  ``dense_steps + steps`` steps on all the batches the other two saw.

Each phase starts a fresh AdamW with the same warm-up (:func:`moe_lib.train.train`); the MoE
layers use the Switch balance loss and the z-loss, as in chapter 8. Per seed, all arms share the
dense initialisation (scratch: the same seed), the batches and the validation batches, so the
comparison is paired. The upcycled MoE does about twice the FFN work of the dense model per token
(two experts of the dense FFN's width): the runs record active and total parameters.

    python -m moe_lib.bench.upcycling --quick --out upcycling.json

One line per run, then, as the last line, a JSON summary: the mean final validation loss per
arm and the per-seed differences. Needs the ``book`` extra (pandas, tqdm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from moe_lib.bench import cli, moe_vs_dense
from moe_lib.checks import (
    check_bool,
    check_int_range,
    check_positive_int,
    check_type,
)
from moe_lib.data import lm_batch, load_code_corpus
from moe_lib.layer import MoE
from moe_lib.models import Transformer, TransformerConfig, ffn_parameter_counts
from moe_lib.runtime import available_device
from moe_lib.train import evaluate, train
from moe_lib.upcycle import upcycle_model, upcycled_equals_dense

ARMS = ("dense", "upcycled", "scratch")
VAL_SEED = 1234  # the fixed validation batches
PHASE_TWO_SEED = 10_000  # phase two's batches: generator seeded PHASE_TWO_SEED + seed


@dataclass(frozen=True)
class Settings(moe_vs_dense.Settings):
    """Chapter 8's settings (:class:`moe_lib.bench.moe_vs_dense.Settings`: ``d_model``,
    ``n_layers``, ``n_heads``, ``h`` (the expert width; the dense FFN has hidden ``top_k * h``,
    and so have the upcycled experts), ``seq_len``, ``batch``, ``steps`` (here phase two),
    ``lr``, ``max_bytes``, ``eval_batches``, ``num_experts``, ``top_k``) and two more:
    ``dense_steps`` (phase one) and ``eval_every``. ``top_k >= 2``: one renormalised expert
    would get weight 1 and its router no gradient from the task."""

    dense_steps: int = 400
    eval_every: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dense_steps", "eval_every"):
            check_positive_int(name, getattr(self, name))
        check_int_range("top_k", self.top_k, 2, self.num_experts)


QUICK = Settings(d_model=64, n_layers=2, n_heads=4, h=64, seq_len=64, batch=16, steps=400,
                 lr=3e-3, max_bytes=400_000, eval_batches=8)
FULL = Settings(d_model=256, n_layers=4, n_heads=8, h=256, seq_len=256, batch=32,
                dense_steps=2000, steps=2000, lr=1e-3, max_bytes=None, eval_batches=32,
                eval_every=200)


def moe_options(settings: Settings) -> dict:
    """The MoE layers' options (chapter 8's, with the experts' width from the dense FFN)."""
    check_type("settings", settings, Settings)
    return {"top_k": settings.top_k, "balance_loss": "switch", "z_loss_coef": 1e-3}


def dense_config(settings: Settings) -> TransformerConfig:
    """Chapter 8's ``dense_active`` model: SwiGLU FFN of hidden ``top_k * h``."""
    check_type("settings", settings, Settings)
    s = settings
    return TransformerConfig(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                             seq_len=s.seq_len, task="lm", ffn="dense", d_hidden=s.top_k * s.h)


def moe_config(settings: Settings) -> TransformerConfig:
    """The upcycled architecture: E SwiGLU experts of hidden ``top_k * h``, top-k."""
    check_type("settings", settings, Settings)
    s = settings
    return TransformerConfig(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                             seq_len=s.seq_len, task="lm", ffn="moe", d_hidden=s.top_k * s.h,
                             moe={"num_experts": s.num_experts, **moe_options(s)})


def expert_spread(layer: MoE) -> float:
    """How far a layer's experts are apart: the mean over experts of ``||W_e - W_mean|| /
    ||W_mean||`` over both weight matrices (0 for identical copies)."""
    check_type("layer", layer, MoE)
    spreads = []
    for w in (layer.experts.w_in, layer.experts.w_out):  # [E, ., .]
        mean = w.detach().mean(dim=0, keepdim=True)
        spreads.append((w.detach() - mean).flatten(1).norm(dim=1) / mean.norm())
    return float(torch.stack(spreads).mean())


def _curve(res) -> dict:
    return res.history.dropna(subset=["val_loss"])[["step", "val_loss"]].to_dict("list")


def run(settings: Settings, seeds: list[int], device: torch.device | str = "cpu",
        progress: bool = True) -> list[dict]:
    """Every arm with every seed; one result dict per run, in the order seed, arm.

    A result holds ``arm``, ``seed``, ``val_loss`` (final, nats per byte over the fixed
    validation batches), ``start_val_loss`` (when phase two starts: the dense model's for
    ``dense`` and ``upcycled``, the initial one for ``scratch``), ``curve`` (validation losses
    during phase two, steps counted from its start; scratch: over its whole run, steps counted
    from its start), ``active_params`` and ``total_params`` (FFN blocks), ``seconds``
    (training wall time of the arm's own phase), for the MoE arms ``expert_spread`` (per
    layer, at the end), for ``upcycled`` ``start_diff`` (the largest logit difference to the
    dense model when upcycled).
    """
    check_type("settings", settings, Settings)
    seeds = cli.check_seeds(seeds)
    device = available_device(device)
    check_bool("progress", progress)
    s = settings
    corpus = load_code_corpus(max_bytes=s.max_bytes)
    g = torch.Generator().manual_seed(VAL_SEED)
    val = [lm_batch(corpus["val"], s.batch, s.seq_len, g) for _ in range(s.eval_batches)]
    common = dict(lr=s.lr, eval_batches=val, eval_every=s.eval_every, device=device,
                  progress=progress)
    results = []
    for seed in seeds:
        phase_one = [lm_batch(corpus["train"], s.batch, s.seq_len, gen)
                     for gen in [torch.Generator().manual_seed(seed)] for _ in range(s.dense_steps)]
        phase_two = [lm_batch(corpus["train"], s.batch, s.seq_len, gen)
                     for gen in [torch.Generator().manual_seed(PHASE_TWO_SEED + seed)]
                     for _ in range(s.steps)]
        torch.manual_seed(seed)
        dense = Transformer(dense_config(s))
        train(dense, lambda i, b=phase_one: b[i], s.dense_steps, seed=seed,
              desc=f"dense pretraining seed {seed}", **common)
        dense_val = evaluate(dense, val, device)
        probe = val[0][0].to(device)
        upcycled = upcycle_model(dense, s.num_experts, **moe_options(s))
        start_diff = upcycled_equals_dense(dense, upcycled, probe)
        torch.manual_seed(seed)
        scratch = Transformer(moe_config(s))
        scratch_start = evaluate(scratch.to(device), val, device)
        both = phase_one + phase_two
        arms = {"dense": (dense, phase_two, dense_val),
                "upcycled": (upcycled, phase_two, dense_val),
                "scratch": (scratch, both, scratch_start)}
        for arm, (model, batches, start) in arms.items():
            res = train(model, lambda i, b=batches: b[i], len(batches), seed=seed,
                        desc=f"{arm} seed {seed}", **common)
            counts = ffn_parameter_counts(model)
            row = {"arm": arm, "seed": seed, "val_loss": evaluate(model, val, device),
                   "start_val_loss": start, "curve": _curve(res),
                   "active_params": counts["active"], "total_params": counts["total"],
                   "seconds": res.seconds}
            if arm != "dense":
                row["expert_spread"] = [expert_spread(m) for m in model.moe_layers()]
            if arm == "upcycled":
                row["start_diff"] = start_diff
            results.append(row)
    return results


_RUN_KEYS = ("arm", "seed", "val_loss", "start_val_loss", "curve")


def _check_results(results: object) -> list[dict]:
    return cli.check_results(results, _RUN_KEYS)


def final_losses(results: list[dict]) -> dict[str, list[float]]:
    """``{arm: [final validation loss per seed]}`` over the seeds run with every arm, in seed
    order."""
    _check_results(results)
    by = {(r["arm"], r["seed"]): r["val_loss"] for r in results}
    seeds = sorted({seed for _, seed in by if all((a, seed) in by for a in ARMS)})
    if not seeds:
        raise ValueError("results must hold every arm for at least one seed")
    return {arm: [by[(arm, seed)] for seed in seeds] for arm in ARMS} | {"seeds": seeds}


def summary(results: list[dict]) -> dict:
    """The last-line JSON: ``{arm}_val_loss`` (mean final validation loss), the per-seed
    differences ``dense_minus_upcycled`` and ``scratch_minus_upcycled`` (> 0: upcycling is
    better), and the seeds."""
    f = final_losses(results)
    out = {f"{arm}_val_loss": sum(f[arm]) / len(f[arm]) for arm in ARMS}
    for other in ("dense", "scratch"):
        out[f"{other}_minus_upcycled"] = [o - u for o, u in zip(f[other], f["upcycled"])]
    out["seeds"] = f["seeds"]
    return out


def format_runs(results: list[dict]) -> str:
    """One line per run: arm, seed, validation loss at the start of phase two and at the end,
    FFN parameters, seconds."""
    _check_results(results)
    lines = [f"{'arm':<10}{'seed':>5}{'start':>9}{'final':>9}{'active':>10}{'total':>10}"
             f"{'time s':>9}"]
    for r in results:
        lines.append(f"{r['arm']:<10}{r['seed']:>5}{r['start_val_loss']:>9.4f}"
                     f"{r['val_loss']:>9.4f}{r.get('active_params', 0):>10}"
                     f"{r.get('total_params', 0):>10}{r.get('seconds', 0.0):>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.upcycling --help``)."""
    p = cli.experiment_parser("upcycling", __doc__, seeds=[0, 1, 2, 3, 4], settings_help=(
        "e.g. --set d_model=32 batch=8: fields of Settings"))
    p.add_argument("--dense-steps", type=int, default=None, help="override phase one's steps")
    args = p.parse_args(argv)
    s, seeds, device = cli.settings_from_args(p, args, QUICK, FULL)
    if args.dense_steps is not None:
        try:
            s = replace(s, dense_steps=args.dense_steps)
        except (TypeError, ValueError) as err:
            p.error(str(err))
    clock = cli.Clock()
    results = run(s, seeds, device, progress=not args.no_progress)
    print(format_runs(results))
    if args.out:
        cli.write_results(args.out, "upcycling", argv, device, s, clock, results,
                          summary(results), arms=list(ARMS), moe_options=moe_options(s),
                          val_seed=VAL_SEED, phase_two_seed=PHASE_TWO_SEED)
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
