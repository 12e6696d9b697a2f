"""MoE language model against dense baselines on the standard library's source (byte level).

Three models, same data, same steps, same seeds:

- ``moe``: every FFN block is ``MoE(num_experts=8, top_k=2, expert="swiglu")`` of hidden h;
- ``dense_active``: a SwiGLU FFN of hidden 2h: the same parameters per token as the MoE;
- ``dense_total``: a SwiGLU FFN of hidden 8h: the same parameters in all as the MoE.

Parameters are counted over the FFN blocks only (routers included in the MoE's counts).
Prints a table, then, as its last line, one JSON object with the mean validation losses, the
parameter counts and the seeds. ``--quick`` is the CPU scale the book uses; without it the run
is longer (for a GPU or a patient CPU). ``--out FILE`` also writes the per-run results as JSON.

    python bench/moe_vs_dense.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from moe_lib.data import lm_batch, load_code_corpus
from moe_lib.models import Transformer, TransformerConfig, ffn_parameter_counts
from moe_lib.train import evaluate, train

QUICK = {"d_model": 64, "n_layers": 2, "n_heads": 4, "h": 64, "seq_len": 64, "batch": 16,
         "steps": 300, "lr": 3e-3, "max_bytes": 400_000, "eval_batches": 8}
FULL = {"d_model": 256, "n_layers": 4, "n_heads": 8, "h": 256, "seq_len": 256, "batch": 32,
        "steps": 3000, "lr": 1e-3, "max_bytes": None, "eval_batches": 32}
NUM_EXPERTS, TOP_K = 8, 2


def model_configs(s: dict) -> dict[str, TransformerConfig]:
    """The three models of the comparison at sizes ``s``."""
    common = dict(d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                  seq_len=s["seq_len"], task="lm")
    moe = {"num_experts": NUM_EXPERTS, "top_k": TOP_K, "expert": "swiglu",
           "balance_loss": "switch", "z_loss_coef": 1e-3}
    return {
        "moe": TransformerConfig(**common, ffn="moe", d_hidden=s["h"], moe=moe),
        "dense_active": TransformerConfig(**common, ffn="dense", d_hidden=TOP_K * s["h"]),
        "dense_total": TransformerConfig(**common, ffn="dense", d_hidden=NUM_EXPERTS * s["h"]),
    }


def run(s: dict, seeds: list[int], device: str, progress: bool = True,
        keep: dict | None = None) -> list[dict]:
    """Train every model with every seed; one result dict per run.

    ``keep``: if a dict is given, the trained models are stored in it under ``(name, seed)``.
    """
    corpus = load_code_corpus(max_bytes=s["max_bytes"])
    g = torch.Generator().manual_seed(1234)
    val = [lm_batch(corpus["val"], s["batch"], s["seq_len"], g) for _ in range(s["eval_batches"])]
    results = []
    for seed in seeds:
        for name, cfg in model_configs(s).items():
            torch.manual_seed(seed)
            model = Transformer(cfg)
            data_gen = torch.Generator().manual_seed(seed)  # same batches for every model

            def next_batch(step: int, gen: torch.Generator = data_gen) -> tuple:
                return lm_batch(corpus["train"], s["batch"], s["seq_len"], gen)

            res = train(model, next_batch, s["steps"], lr=s["lr"], eval_batches=val,
                        eval_every=max(1, s["steps"] // 5), device=device, seed=seed,
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
    """The last-line JSON: mean validation loss per model and FFN parameter counts."""
    out: dict = {}
    for name in ("moe", "dense_active", "dense_total"):
        rows = [r for r in results if r["model"] == name]
        out[f"{name}_val_loss"] = sum(r["val_loss"] for r in rows) / len(rows)
    by = {r["model"]: r for r in results}
    out["moe_active_params"] = by["moe"]["active_params"]
    out["moe_total_params"] = by["moe"]["total_params"]
    out["dense_active_params"] = by["dense_active"]["total_params"]
    out["dense_total_params"] = by["dense_total"]["total_params"]
    out["seeds"] = seeds
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CPU-scale settings (used by the book)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write all runs to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if len(args.seeds) < 1:
        p.error("--seeds needs at least one seed")
    s = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        if args.steps < 1:
            p.error(f"--steps must be >= 1, got {args.steps}")
        s["steps"] = args.steps
    start = time.perf_counter()
    results = run(s, args.seeds, args.device, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(f"{'model':<14}{'seed':>5}{'val loss':>10}{'active':>10}{'total':>10}{'time s':>9}")
    for r in results:
        print(f"{r['model']:<14}{r['seed']:>5}{r['val_loss']:>10.4f}{r['active_params']:>10}"
              f"{r['total_params']:>10}{r['seconds']:>9.1f}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else
                platform.processor() or platform.machine(), "settings": s,
                "seconds": elapsed, "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "runs": results, "summary": summary(results, args.seeds)}, f,
                      indent=1)
    print(json.dumps(summary(results, args.seeds)))


if __name__ == "__main__":
    main()
