"""Byte-level language-model runs behind chapter 8 that are too long for the chapter.

On the standard library's source, at the sizes of :data:`moe_lib.bench.moe_vs_dense.QUICK`
(trained longer), with the same batches for every model of a seed:

- **MoE against dense, with a clock.** :mod:`moe_lib.bench.moe_vs_dense`'s three models
  (``moe``: E experts of hidden h, top-k; ``dense_active``: SwiGLU of hidden k h; ``dense_total``:
  hidden E h), evaluated every ``eval_every`` steps; each point also records the training time
  spent so far, process CPU time and wall time, evaluation excluded. That answers "how many steps
  does the MoE need to reach dense_active's final loss?" and "which is ahead at equal time?".
- **More experts at a fixed active size** (Switch Transformer, Fedus et al. 2021, figure 4):
  ``switch_E{n}``: top-1 MoE layers with ``n`` experts, each of hidden k h, so every token uses
  the FFN parameters of ``dense_active`` (plus the router's ``d n`` weights); raw gate
  probability, Switch balancing loss (alpha = 1e-2), no capacity limit. ``dense_active`` is the
  point E = 1.
- **Routing over training**: for every MoE model, the share of kept assignments of each expert in
  each layer, averaged over the steps of each evaluation interval: ``[intervals, layers, E]``.
- **Mixtral's table 5** (Jiang et al. 2024): per layer, on the fixed validation windows after
  training, how often two consecutive tokens have the same first-choice expert, and how often
  their top-k sets share an expert (:func:`consecutive_repeats`), against the values for
  uniformly random choices (:func:`chance_repeats`: 1/E and 1 - C(E-k, k) / C(E, k)).

    python -m moe_lib.bench.lm_experts --steps 1500 --seeds 0 1 2 3 4 --out FILE

The command prints one line per run, then, as its last line, one JSON object (mean final
validation loss per model). ``--out FILE`` writes ``{"meta", "runs", "summary"}`` after every
seed (so a long run that stops keeps its finished seeds); ``meta`` holds the machine
(:func:`moe_lib.bench.machine.machine_record`), the settings, the thread count and the wall time.
Needs the ``book`` extra (pandas, tqdm) for :mod:`moe_lib.train`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from moe_lib.bench import cli
from moe_lib.bench.moe_vs_dense import QUICK, Settings, parse_overrides
from moe_lib.bench.moe_vs_dense import model_configs as moe_vs_dense_configs
from moe_lib.checks import check_bool, check_int, check_positive_int, check_tensor, check_type
from moe_lib.data import lm_batch, load_code_corpus
from moe_lib.models import Transformer, TransformerConfig, ffn_parameter_counts
from moe_lib.runtime import as_device, default_device
from moe_lib.train import evaluate, train

EXPERTS = (2, 4, 8, 16)
"""Expert counts of the Switch sweep (E = 1 is ``dense_active``)."""
STEPS = 1500
"""Training steps of the stored run (the QUICK sizes of moe_vs_dense, five times its steps)."""
EVAL_EVERY = 50


def chance_repeats(num_experts: int, top_k: int) -> tuple[float, float]:
    """Repeat rates of uniformly random routing: ``(first, shared)``.

    ``first = 1 / E``: two tokens draw the same first choice. ``shared = 1 - C(E-k, k) / C(E, k)``:
    two random k-subsets of the E experts intersect (Mixtral's "first or second choice" for
    k = 2, E = 8: 1 - (6/8)(5/7), about 46%). For k = 1 both are 1/E.
    """
    check_positive_int("num_experts", num_experts)
    check_int("top_k", top_k, low=1, high=num_experts)
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return 1.0 / num_experts, 1.0 - disjoint


def consecutive_repeats(expert_ids: Tensor, seq_len: int) -> tuple[float, float]:
    """How often consecutive tokens repeat an expert: ``(first, shared)`` rates in [0, 1].

    ``expert_ids: [B * seq_len, k]`` in the order of a ``Routing`` of ``[B, seq_len]`` tokens
    (choices ordered by weight, first choice in column 0). Over the pairs (t, t + 1) inside each
    sequence: ``first`` is the share with ``ids[t, 0] == ids[t + 1, 0]``; ``shared`` the share
    whose k-sets intersect (any ``ids[t, i] == ids[t + 1, j]``).
    """
    check_tensor("expert_ids", expert_ids, dims=2, kind="int")
    check_int("seq_len", seq_len, low=2)
    if expert_ids.shape[0] % seq_len:
        raise ValueError(f"seq_len must divide the {expert_ids.shape[0]} rows of expert_ids, "
                         f"got {seq_len}")
    ids = expert_ids.reshape(-1, seq_len, expert_ids.shape[1])      # [B, S, k]
    now, nxt = ids[:, :-1], ids[:, 1:]                              # [B, S-1, k] each
    first = (now[..., 0] == nxt[..., 0]).float().mean().item()
    shared = (now[..., :, None] == nxt[..., None, :]).flatten(-2).any(-1).float().mean().item()
    return first, shared


def model_configs(settings: Settings, experts: tuple[int, ...] = EXPERTS
                  ) -> dict[str, TransformerConfig]:
    """moe_vs_dense's three models, then ``switch_E{n}`` for each n of ``experts`` (each >= 2)."""
    check_type("settings", settings, Settings)
    experts = _check_experts(experts)
    s = settings
    configs = moe_vs_dense_configs(s)
    common = dict(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                  seq_len=s.seq_len, task="lm")
    for n in experts:
        switch = {"num_experts": n, "top_k": 1, "weighting": "raw", "expert": "swiglu",
                  "balance_loss": "switch"}
        configs[f"switch_E{n}"] = TransformerConfig(**common, ffn="moe",
                                                    d_hidden=s.top_k * s.h, moe=switch)
    return configs


def _check_experts(experts: object) -> tuple[int, ...]:
    if not isinstance(experts, (list, tuple)):
        raise TypeError(f"experts must be a tuple of ints >= 2, got {type(experts).__name__}")
    for i, n in enumerate(experts):
        check_int(f"experts[{i}]", n, low=2, high=1024)
    if len(set(experts)) != len(experts):
        raise ValueError(f"experts must be distinct, got {list(experts)}")
    return tuple(experts)


class _Probe:
    """``next_batch`` for :func:`moe_lib.train.train` that, every ``every`` steps, evaluates the
    model first and records the training time so far (CPU and wall, evaluation excluded)."""

    def __init__(self, model: Transformer, val: list, device: torch.device, every: int,
                 draw: Callable[[], tuple[Tensor, Tensor]]) -> None:
        self.model, self.val, self.device, self.every, self.draw = model, val, device, every, draw
        self.curve: dict[str, list] = {"step": [], "val_loss": [], "cpu_s": [], "wall_s": []}
        self.cpu0 = self.wall0 = 0.0
        self.cpu_eval = self.wall_eval = 0.0

    def record(self, step: int) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        if step == 0:
            self.cpu0, self.wall0 = cpu, wall
        self.curve["step"].append(step)
        self.curve["cpu_s"].append(cpu - self.cpu0 - self.cpu_eval)
        self.curve["wall_s"].append(wall - self.wall0 - self.wall_eval)
        self.curve["val_loss"].append(evaluate(self.model, self.val, self.device))
        self.cpu_eval += time.process_time() - cpu
        self.wall_eval += time.perf_counter() - wall

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        if step % self.every == 0:
            self.record(step)
        return self.draw()


@torch.no_grad()
def _routing_at_end(model: Transformer, val: list, device: torch.device) -> dict:
    """Per layer, on the validation windows: repeat rates and each expert's share."""
    model.eval()
    ids: list[list[Tensor]] = [[] for _ in model.moe_layers()]
    for x, _ in val:
        out = model(x.to(device))
        for layer, r in enumerate(out.routings):
            ids[layer].append(r.expert_ids.cpu())
    seq_len = val[0][0].shape[1]
    first, shared, share = [], [], []
    for layer_ids in ids:
        all_ids = torch.cat(layer_ids)                                # [tokens, k]
        f, s = consecutive_repeats(all_ids, seq_len)
        first.append(f)
        shared.append(s)
        n = model.moe_layers()[0].config.num_experts
        share.append((torch.bincount(all_ids[:, 0], minlength=n) / all_ids.shape[0]).tolist())
    return {"first": first, "shared": shared, "first_choice_share": share}


def run(settings: Settings, seeds: list[int], experts: tuple[int, ...] = EXPERTS,
        eval_every: int = EVAL_EVERY, device: torch.device | str = "cpu",
        progress: bool = True, models: tuple[str, ...] | None = None,
        keep: dict | None = None) -> list[dict]:
    """Train the models of :func:`model_configs` with every seed; one dict per run.

    ``models``: the names to train (None: all of them, in the order of :func:`model_configs`).
    ``keep``: if a dict is given, the trained models are stored in it under ``(name, seed)``.

    A run holds ``model``, ``seed``, ``num_experts`` and ``top_k`` (1 and 1 for a dense model),
    ``val_loss`` (final, nats per byte on the fixed validation batches), ``active_params`` and
    ``total_params`` (FFN blocks), ``seconds`` (wall time of the run), ``curve`` (``step``,
    ``val_loss``, ``cpu_s``, ``wall_s`` every ``eval_every`` steps and after the last) and, for
    an MoE, ``shares`` (``[intervals, layers, E]``) and ``repeats`` (per layer ``first``,
    ``shared`` and ``first_choice_share`` after training).
    """
    check_type("settings", settings, Settings)
    seeds = cli.check_seeds(seeds)
    experts = _check_experts(experts)
    check_positive_int("eval_every", eval_every)
    device = as_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be available: {device} needs a CUDA GPU")
    check_bool("progress", progress)
    configs = model_configs(settings, experts)
    if models is None:
        models = tuple(configs)
    if not isinstance(models, (list, tuple)) or not models:
        raise TypeError(f"models must be a non-empty tuple of names of {list(configs)}, got "
                        f"{models!r}")
    unknown = [m for m in models if m not in configs]
    if unknown:
        raise ValueError(f"models must be names of {list(configs)}, got {unknown}")
    if keep is not None:
        check_type("keep", keep, dict)
    s = settings
    corpus = load_code_corpus(max_bytes=s.max_bytes)
    g = torch.Generator().manual_seed(1234)  # the validation batches of moe_vs_dense.run
    val = [lm_batch(corpus["val"], s.batch, s.seq_len, g) for _ in range(s.eval_batches)]
    results = []
    for seed in seeds:
        for name in models:
            cfg = configs[name]
            torch.manual_seed(seed)
            model = Transformer(cfg)
            data_gen = torch.Generator().manual_seed(seed)  # same batches for every model
            probe = _Probe(model, val, device, eval_every,
                           lambda gen=data_gen: lm_batch(corpus["train"], s.batch, s.seq_len, gen))
            start = time.perf_counter()
            res = train(model, probe, s.steps, lr=s.lr, device=device, seed=seed,
                        progress=progress, desc=f"{name} seed {seed}")
            probe.record(s.steps)
            seconds = time.perf_counter() - start
            counts = ffn_parameter_counts(model)
            if keep is not None:
                keep[(name, seed)] = model
            moe = cfg.moe
            row = {"model": name, "seed": seed,
                   "num_experts": moe.num_experts if moe else 1,
                   "top_k": moe.top_k if moe else 1,
                   "val_loss": probe.curve["val_loss"][-1],
                   "active_params": counts["active"], "total_params": counts["total"],
                   "seconds": seconds, "curve": probe.curve}
            if moe is not None:
                per_step = res.expert_share                              # [steps, L, E]
                n = s.steps // eval_every
                blocks = per_step[: n * eval_every].reshape(n, eval_every, *per_step.shape[1:])
                row["shares"] = blocks.mean(1).tolist()                  # [intervals, L, E]
                row["repeats"] = _routing_at_end(model, val, device)
            results.append(row)
    return results


_RUN_KEYS = ("model", "seed", "val_loss", "curve")


def summary(results: list[dict]) -> dict:
    """The last-line JSON: ``{model}_val_loss`` (mean over seeds) for every model, ``seeds``."""
    check_type("results", results, list)
    if not results:
        raise ValueError("results must hold at least one run of run(), got none")
    for i, r in enumerate(results):
        check_type(f"results[{i}]", r, dict)
        missing = [k for k in _RUN_KEYS if k not in r]
        if missing:
            raise ValueError(f"results[{i}] must be a result of run(), misses {missing}")
    out: dict = {}
    for name in dict.fromkeys(r["model"] for r in results):
        losses = [r["val_loss"] for r in results if r["model"] == name]
        out[f"{name}_val_loss"] = sum(losses) / len(losses)
    out["seeds"] = sorted({r["seed"] for r in results})
    return out


def format_runs(results: list[dict]) -> str:
    """One line per run: model, seed, final validation loss, FFN parameters, CPU and wall s."""
    summary(results)  # checks the runs
    lines = [f"{'model':<14}{'seed':>5}{'val loss':>10}{'active':>9}{'total':>9}"
             f"{'cpu s':>8}{'wall s':>8}"]
    for r in results:
        lines.append(f"{r['model']:<14}{r['seed']:>5}{r['val_loss']:>10.4f}"
                     f"{r['active_params']:>9}{r['total_params']:>9}"
                     f"{r['curve']['cpu_s'][-1]:>8.1f}{r['curve']['wall_s'][-1]:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.lm_experts --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m moe_lib.bench.lm_experts", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS),
                   help="expert counts of the Switch sweep (each >= 2)")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU time is "
                   "a clean measure of work on one thread)")
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--out", default=None, help="also write all runs to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override QUICK's settings, e.g. --set d_model=128 n_heads=8")
    args = p.parse_args(argv)
    try:
        s = replace(QUICK, **parse_overrides(args.set))
        s = replace(s, steps=args.steps)
        seeds = cli.check_seeds(args.seeds)
        experts = _check_experts(tuple(args.experts))
        check_positive_int("--eval-every", args.eval_every)
        check_positive_int("--threads", args.threads)
        device = as_device(args.device)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    torch.set_num_threads(args.threads)
    clock = cli.Clock()
    results: list[dict] = []
    for seed in seeds:  # the file is rewritten after every seed: a long run keeps what it did
        results += run(s, [seed], experts, args.eval_every, device,
                       progress=not args.no_progress)
        if args.out:
            cli.write_results(args.out, "lm_experts", argv, device, s, clock, results,
                              summary(results), experts=list(experts),
                              eval_every=args.eval_every)
    print(format_runs(results))
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
