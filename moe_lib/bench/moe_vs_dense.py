"""MoE language model against dense baselines on the standard library's source (byte level).

Three models, same data, same steps, same seeds (E experts of hidden h, top-k; 8 and 2 by
default):

- ``moe``: every FFN block is ``MoE(num_experts=E, top_k=k, expert="swiglu")`` of hidden h;
- ``dense_active``: a SwiGLU FFN of hidden k*h: the same parameters per token as the MoE;
- ``dense_total``: a SwiGLU FFN of hidden E*h: the same parameters in all as the MoE.

Parameters are counted over the FFN blocks only (routers included in the MoE's counts): per
block ``d E + k 3 d h`` active and ``d E + E 3 d h`` in all for the MoE, ``3 d k h`` and
``3 d E h`` for the dense models. The command line prints a table, then, as its last line, one
JSON object with the mean validation losses, the parameter counts and the seeds. ``--quick`` is
the CPU scale the book uses (:data:`QUICK`); without it the run is longer (:data:`FULL`, for a
GPU or a patient CPU). ``--out FILE`` also writes the per-run results as JSON, with the machine
they ran on (see :mod:`moe_lib.bench.results` for the stored ones).

    python -m moe_lib.bench.moe_vs_dense --quick

Needs the ``book`` extra (pandas, tqdm) for :mod:`moe_lib.train`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from moe_lib.bench import cli
from moe_lib.checks import (
    check_bool,
    check_int_range,
    check_positive,
    check_positive_int,
    check_type,
)
from moe_lib.data import lm_batch, load_code_corpus
from moe_lib.models import Transformer, TransformerConfig, ffn_parameter_counts
from moe_lib.runtime import available_device
from moe_lib.train import evaluate, train

NUM_EXPERTS, TOP_K = 8, 2
MODELS = ("moe", "dense_active", "dense_total")


@dataclass(frozen=True)
class Settings:
    """Sizes and training of one comparison, checked when made.

    ``d_model``, ``n_layers``, ``n_heads`` (dividing d_model), ``h`` (hidden width of one
    expert), ``seq_len`` (bytes per window), ``batch`` (windows per step), ``steps``, ``lr``
    (AdamW, > 0), ``max_bytes`` (cap on the corpus; None: all of it), ``eval_batches``
    (validation batches), ``num_experts`` and ``top_k`` (in [1, num_experts]). Change one with
    ``dataclasses.replace(QUICK, steps=1500)``, which checks again.
    """

    d_model: int
    n_layers: int
    n_heads: int
    h: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    max_bytes: int | None
    eval_batches: int
    num_experts: int = NUM_EXPERTS
    top_k: int = TOP_K

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "h", "seq_len", "batch", "steps",
                     "eval_batches", "num_experts"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model={self.d_model}, got {self.n_heads}")
        check_positive("lr", self.lr)
        object.__setattr__(self, "lr", float(self.lr))
        if self.max_bytes is not None:
            check_positive_int("max_bytes", self.max_bytes)
        check_int_range("top_k", self.top_k, 1, self.num_experts)

    def to_dict(self) -> dict:
        """The fields as a dict (what ``--out`` files record under ``meta.settings``)."""
        return asdict(self)


QUICK = Settings(d_model=64, n_layers=2, n_heads=4, h=64, seq_len=64, batch=16, steps=300,
                 lr=3e-3, max_bytes=400_000, eval_batches=8)
FULL = Settings(d_model=256, n_layers=4, n_heads=8, h=256, seq_len=256, batch=32, steps=3000,
                lr=1e-3, max_bytes=None, eval_batches=32)


def model_configs(settings: Settings) -> dict[str, TransformerConfig]:
    """The three models of the comparison (:data:`MODELS`) at ``settings``."""
    check_type("settings", settings, Settings)
    s = settings
    common = dict(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                  seq_len=s.seq_len, task="lm")
    moe = {"num_experts": s.num_experts, "top_k": s.top_k, "expert": "swiglu",
           "balance_loss": "switch", "z_loss_coef": 1e-3}
    return {
        "moe": TransformerConfig(**common, ffn="moe", d_hidden=s.h, moe=moe),
        "dense_active": TransformerConfig(**common, ffn="dense", d_hidden=s.top_k * s.h),
        "dense_total": TransformerConfig(**common, ffn="dense", d_hidden=s.num_experts * s.h),
    }


_RUN_KEYS = ("model", "seed", "val_loss", "active_params", "total_params", "seconds")


def _check_results(results: object) -> list[dict]:
    return cli.check_results(results, _RUN_KEYS)


def run(settings: Settings, seeds: list[int], device: torch.device | str = "cpu",
        progress: bool = True, keep: dict | None = None) -> list[dict]:
    """Train every model with every seed; one result dict per run, in the order seed, model.

    A result holds ``model``, ``seed``, ``val_loss`` (mean cross-entropy in nats per byte over
    the fixed validation batches), ``active_params`` and ``total_params`` (FFN blocks),
    ``seconds`` (training wall time) and ``curve`` (``{"step": [...], "val_loss": [...]}``).
    Every model sees the same batches for a given seed. ``keep``: if a dict is given, the
    trained models are stored in it under ``(model, seed)``.
    """
    check_type("settings", settings, Settings)
    seeds = cli.check_seeds(seeds)
    device = available_device(device)
    check_bool("progress", progress)
    if keep is not None:
        check_type("keep", keep, dict)
    s = settings
    corpus = load_code_corpus(max_bytes=s.max_bytes)
    g = torch.Generator().manual_seed(1234)
    val = [lm_batch(corpus["val"], s.batch, s.seq_len, g) for _ in range(s.eval_batches)]
    results = []
    for seed in seeds:
        for name, cfg in model_configs(s).items():
            torch.manual_seed(seed)
            model = Transformer(cfg)
            data_gen = torch.Generator().manual_seed(seed)  # same batches for every model

            def next_batch(step: int, gen: torch.Generator = data_gen) -> tuple:
                return lm_batch(corpus["train"], s.batch, s.seq_len, gen)

            res = train(model, next_batch, s.steps, lr=s.lr, eval_batches=val,
                        eval_every=max(1, s.steps // 5), device=device, seed=seed,
                        progress=progress, desc=f"{name} seed {seed}")
            counts = ffn_parameter_counts(model)
            if keep is not None:
                keep[(name, seed)] = model
            results.append({
                "model": name, "seed": seed, "val_loss": evaluate(model, val, device),
                "active_params": counts["active"], "total_params": counts["total"],
                "seconds": res.seconds,
                "curve": res.history.dropna(subset=["val_loss"])[["step", "val_loss"]]
                .to_dict("list"),
            })
    return results


def summary(results: list[dict], seeds: list[int]) -> dict:
    """The last-line JSON: mean validation loss per model and FFN parameter counts.

    Keys: ``{model}_val_loss`` for each of :data:`MODELS`, ``moe_active_params``,
    ``moe_total_params``, ``dense_active_params``, ``dense_total_params``, ``seeds``.
    """
    _check_results(results)
    seeds = cli.check_seeds(seeds)
    out: dict = {}
    for name in MODELS:
        rows = [r for r in results if r["model"] == name]
        if not rows:
            raise ValueError(f"results must hold runs of every model {MODELS}, none of {name!r}")
        out[f"{name}_val_loss"] = sum(r["val_loss"] for r in rows) / len(rows)
    by = {r["model"]: r for r in results}
    out["moe_active_params"] = by["moe"]["active_params"]
    out["moe_total_params"] = by["moe"]["total_params"]
    out["dense_active_params"] = by["dense_active"]["total_params"]
    out["dense_total_params"] = by["dense_total"]["total_params"]
    out["seeds"] = seeds
    return out


def format_runs(results: list[dict]) -> str:
    """One line per run: model, seed, validation loss, FFN parameters, training seconds."""
    _check_results(results)
    lines = [f"{'model':<14}{'seed':>5}{'val loss':>10}{'active':>10}{'total':>10}{'time s':>9}"]
    for r in results:
        lines.append(f"{r['model']:<14}{r['seed']:>5}{r['val_loss']:>10.4f}"
                     f"{r['active_params']:>10}{r['total_params']:>10}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    """``["d_model=128", "max_bytes=None"]`` -> ``{"d_model": 128, "max_bytes": None}``: the
    ``--set`` overrides of :class:`Settings` (:func:`moe_lib.bench.cli.parse_overrides`)."""
    return cli.parse_overrides(items, Settings)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.moe_vs_dense --help``)."""
    p = cli.experiment_parser("moe_vs_dense", __doc__, seeds=[0, 1, 2], threads=None,
                              settings_help="e.g. --set d_model=128 n_heads=8: fields of Settings")
    args = p.parse_args(argv)
    s, seeds, device = cli.settings_from_args(p, args, QUICK, FULL)
    clock = cli.Clock()
    results = run(s, seeds, device, progress=not args.no_progress)
    print(format_runs(results))
    if args.out:
        cli.write_results(args.out, "moe_vs_dense", argv, device, s, clock, results,
                          summary(results, seeds))
    print(json.dumps(summary(results, seeds)))


if __name__ == "__main__":
    main()
