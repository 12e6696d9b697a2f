"""Balancing without an auxiliary loss (DeepSeek-V3) against the Switch loss, on real text.

The model is chapter 8's byte-level language model with a DeepSeek-V3-style router in every MoE
block: E = 16 SwiGLU experts of hidden h (32), top-4, sigmoid affinities, group-limited
selection (4 groups of 4 experts, each token's experts from its best 2 groups), gate weights
renormalised over the chosen experts. Only the balancing differs between the *methods*
(:data:`METHODS`):

- ``none``: no balancing;
- ``bias-<gamma>``: the selection-only bias, moved after every optimizer step by
  ``b_i += gamma * sign(mean load - load_i)`` (Wang et al. 2024; DeepSeek-V3), gamma in
  1e-4, 1e-3, 1e-2; ``bias-1e-3-frozen`` sets gamma to 0 after 75% of the steps (DeepSeek-V3
  froze it for its last 500B tokens); ``bias-1e-3+seq-1e-4`` adds DeepSeek-V3's sequence-wise
  balance loss with alpha = 1e-4;
- ``switch-<alpha>``: the Switch loss, alpha in 1e-3, 1e-2, 1e-1, the value of the weighted loss
  under uniform routing (coefficient alpha / k on moe_lib's per-slot loss, whose uniform value
  is k);
- ``micro-switch-1e-2`` and ``global-switch-1e-2``: the Switch loss under gradient accumulation
  over 4 micro-batches, computed per micro-batch or with the counts f pooled over the step's
  global batch (Qiu et al. 2025).

The data are the standard library's source (``moe_lib.data.LM_PACKAGES``, all bytes). Every
step is 4 micro-batches of ``batch / 4`` windows, each micro-batch from one package drawn at
random, as a data-parallel rank's micro-batch holds few documents; the methods without
gradient accumulation train on the same windows, the 4 micro-batches as one batch. Recorded per
run: the validation loss (curve and final), the maximal violation of balance
``MaxVio = max_i load_i / mean_i load_i - 1`` of every training step and layer (the step's
micro-batches pooled), the final selection biases, and, on validation windows of each package
routed after training, each package's share of assignments per expert. For seed 0 the share of
assignments per expert every ``SHARE_EVERY`` steps is kept too (heatmaps).

    python -m moe_lib.bench.loss_free --quick --out loss_free.json

Needs the ``book`` extra (pandas, tqdm) for :mod:`moe_lib.train`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from functools import partial

import torch

from moe_lib.bench import cli
from moe_lib.bench.moe_vs_dense import Settings
from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int,
    check_nonnegative,
    check_real,
    check_type,
)
from moe_lib.data import LM_PACKAGES, SPLITS, ByteCorpus, lm_batch, load_code_corpus
from moe_lib.models import Transformer, TransformerConfig
from moe_lib.runtime import available_device
from moe_lib.train import evaluate, train

N_GROUP, TOPK_GROUP = 4, 2
MICRO_BATCHES = 4
SHARE_EVERY = 10
PROBE_WINDOWS = 16  # validation windows per package routed after training
QUICK = Settings(d_model=64, n_layers=2, n_heads=4, h=32, seq_len=64, batch=16, steps=500,
                 lr=3e-3, max_bytes=None, eval_batches=8, num_experts=16, top_k=4)
FULL = replace(QUICK, d_model=256, n_layers=4, n_heads=8, h=128, seq_len=256, batch=32,
               steps=3000, lr=1e-3, eval_batches=32, num_experts=64, top_k=8)


@dataclass(frozen=True)
class Method:
    """One way to balance (see the module docstring).

    ``gamma``: the bias update rate (None: no selection bias); ``freeze_at``: fraction of the
    steps after which gamma is 0; ``balance_loss``: None | "switch" | "sequence_wise" with its
    ``alpha`` (the weighted loss's value under uniform routing); ``micro_batches``: gradient
    accumulation; ``global_alpha``: the global-batch Switch loss's alpha (f pooled over the
    step's micro-batches).
    """

    name: str
    gamma: float | None = None
    freeze_at: float | None = None
    balance_loss: str | None = None
    alpha: float | None = None
    micro_batches: int = 1
    global_alpha: float | None = None

    def __post_init__(self) -> None:
        check_type("name", self.name, str)
        if self.gamma is not None:
            check_nonnegative("gamma", self.gamma)
        if self.freeze_at is not None:
            check_real("freeze_at", self.freeze_at, 0.0, 1.0)
            if self.gamma is None:
                raise ValueError("freeze_at applies to a bias update: give gamma too")
        if self.balance_loss not in (None, "switch", "sequence_wise"):
            raise ValueError(f"balance_loss must be None, 'switch' or 'sequence_wise', got "
                             f"{self.balance_loss!r}")
        if (self.balance_loss is None) != (self.alpha is None):
            raise ValueError("balance_loss and alpha go together: give both or neither")
        if self.alpha is not None:
            check_nonnegative("alpha", self.alpha)
        check_int("micro_batches", self.micro_batches, low=1)
        if self.global_alpha is not None:
            check_nonnegative("global_alpha", self.global_alpha)
            if self.balance_loss is not None:
                raise ValueError("global_alpha replaces balance_loss: give one of them")

    def gamma_at(self, step: int, steps: int) -> float:
        """The bias update rate after optimizer step ``step`` of ``steps`` (0 once frozen)."""
        if self.gamma is None:
            raise ValueError(f"method {self.name!r} has no bias update (gamma is None)")
        if self.freeze_at is not None and step >= self.freeze_at * steps:
            return 0.0
        return self.gamma


METHODS = (
    Method("none"),
    Method("bias-1e-4", gamma=1e-4),
    Method("bias-1e-3", gamma=1e-3),
    Method("bias-1e-2", gamma=1e-2),
    Method("switch-1e-3", balance_loss="switch", alpha=1e-3),
    Method("switch-1e-2", balance_loss="switch", alpha=1e-2),
    Method("switch-1e-1", balance_loss="switch", alpha=1e-1),
    Method("bias-1e-3-frozen", gamma=1e-3, freeze_at=0.75),
    Method("bias-1e-3+seq-1e-4", gamma=1e-3, balance_loss="sequence_wise", alpha=1e-4),
    Method("micro-switch-1e-2", balance_loss="switch", alpha=1e-2, micro_batches=MICRO_BATCHES),
    Method("global-switch-1e-2", micro_batches=MICRO_BATCHES, global_alpha=1e-2),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


def model_config(settings: Settings, method: Method) -> TransformerConfig:
    """The language model of ``method`` at ``settings`` (``h``: each expert's hidden width)."""
    check_type("settings", settings, Settings)
    check_type("method", method, Method)
    s = settings
    moe = {"num_experts": s.num_experts, "top_k": s.top_k, "expert": "swiglu",
           "score": "sigmoid", "n_group": N_GROUP, "topk_group": TOPK_GROUP,
           "selection_bias": method.gamma is not None}
    if method.balance_loss == "switch":  # moe_lib's per-slot loss is k under uniform routing
        moe.update(balance_loss="switch", balance_coef=method.alpha / s.top_k)
    elif method.balance_loss == "sequence_wise":  # 1 under uniform routing
        moe.update(balance_loss="sequence_wise", balance_coef=method.alpha)
    return TransformerConfig(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                             seq_len=s.seq_len, d_hidden=s.h, task="lm", moe=moe)


def package_corpora(packages: tuple[str, ...] = LM_PACKAGES) -> dict[str, ByteCorpus]:
    """Each package's own train/val/test split (``moe_lib.data.load_code_corpus``)."""
    if isinstance(packages, str) or not isinstance(packages, tuple) or not packages:
        raise TypeError(f"packages must be a non-empty tuple of package names, got {packages!r}")
    return {p: load_code_corpus((p,)) for p in packages}


def _check_corpora(corpora: object) -> None:
    check_type("corpora", corpora, dict)
    if not corpora:
        raise ValueError("corpora must hold at least one package's ByteCorpus, got none")
    for name, corpus in corpora.items():
        check_type(f"corpora[{name!r}]", corpus, ByteCorpus)


def domain_batch(corpora: dict[str, ByteCorpus], split: str, windows: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One micro-batch: ``windows`` windows of one package drawn uniformly at random.

    Returns ``x, y: [windows, seq_len]`` and the package's index in ``corpora``.
    """
    _check_corpora(corpora)
    check_choice("split", split, SPLITS)
    check_int("windows", windows, low=1)
    check_int("seq_len", seq_len, low=1)
    check_type("generator", generator, torch.Generator)
    names = list(corpora)
    p = int(torch.randint(len(names), (1,), generator=generator))
    x, y = lm_batch(corpora[names[p]][split], windows, seq_len, generator)
    return x, y, p


def step_batches(corpora: dict[str, ByteCorpus], settings: Settings, seed: int,
                 micro_batches: int):
    """``next_batch(i)`` for :func:`moe_lib.train.train`: with ``micro_batches`` m, call i gives
    micro-batch i (``batch / m`` windows of one package); with m = 1, call i gives the
    :data:`MICRO_BATCHES` micro-batches of step i as one batch. Both draw the same windows in
    the same order from a generator seeded by ``seed``, so every method sees the same data."""
    _check_corpora(corpora)
    check_type("settings", settings, Settings)
    check_int("seed", seed, low=0, high=2**32 - 1)
    check_int("micro_batches", micro_batches, low=1)
    s = settings
    per_micro = s.batch // MICRO_BATCHES
    gen = torch.Generator().manual_seed(seed)

    def one() -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = domain_batch(corpora, "train", per_micro, s.seq_len, gen)
        return x, y

    if micro_batches == MICRO_BATCHES:
        return lambda i: one()
    if micro_batches != 1:
        raise ValueError(f"micro_batches must be 1 or {MICRO_BATCHES}, got {micro_batches}")

    def whole(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [one() for _ in range(MICRO_BATCHES)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return whole


@torch.no_grad()
def package_probe(model: Transformer, corpora: dict[str, ByteCorpus], seq_len: int,
                  windows: int = PROBE_WINDOWS) -> dict:
    """Route ``windows`` validation windows of each package (eval mode; the same windows for
    every model). Returns ``package_shares: [L][P][E]`` (each package's share of assignments
    per expert), ``package_max_violation: [L][P]`` and ``max_violation: [L]`` (all packages'
    windows pooled)."""
    check_type("model", model, Transformer)
    _check_corpora(corpora)
    check_int("seq_len", seq_len, low=1)
    check_int("windows", windows, low=1)
    model.eval()
    counts = []  # [P] of [L, E]
    for i, name in enumerate(corpora):
        x, _ = lm_batch(corpora[name]["val"], windows, seq_len,
                        torch.Generator().manual_seed(4321 + i))
        out = model(x.to(model.tok.weight.device))
        counts.append(torch.stack([r.tokens_per_expert.cpu() for r in out.routings]).double())
    c = torch.stack(counts, dim=1)  # [L, P, E]
    shares = c / c.sum(-1, keepdim=True)
    pooled = c.sum(1)  # [L, E]
    return {
        "package_shares": [[[round(v, 5) for v in row] for row in layer] for layer in
                           shares.tolist()],
        "package_max_violation": (c.amax(-1) / c.mean(-1) - 1).tolist(),
        "max_violation": (pooled.amax(-1) / pooled.mean(-1) - 1).tolist(),
    }


def _check_methods(methods: object) -> list[Method]:
    if not isinstance(methods, (list, tuple)):
        raise TypeError(f"methods must be a list of Method, got {type(methods).__name__}")
    if not methods:
        raise ValueError("methods must hold at least one Method, got none")
    for i, m in enumerate(methods):
        check_type(f"methods[{i}]", m, Method)
    if len({m.name for m in methods}) != len(methods):
        raise ValueError(f"methods must have distinct names, got {[m.name for m in methods]}")
    return list(methods)


def run(settings: Settings, seeds: list[int], methods: tuple[Method, ...] = METHODS,
        device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """Train every method with every seed; one result dict per run (order: seed, method).

    A result holds ``method``, ``seed``, ``val_loss`` (nats per byte, fixed validation
    batches), ``curve`` (validation loss during training), ``max_violation: [steps][L]`` (each
    training step's MaxVio per layer, the step's micro-batches pooled), ``bias: [L][E]`` (final
    selection biases; zeros without a bias), ``probe`` (:func:`package_probe`), ``seconds``, and
    for seed 0 ``shares: [steps / SHARE_EVERY][L][E]`` (share of assignments per expert every
    ``SHARE_EVERY`` steps).
    """
    check_type("settings", settings, Settings)
    seeds = cli.check_seeds(seeds)
    methods = _check_methods(methods)
    device = available_device(device)
    check_bool("progress", progress)
    s = settings
    if s.batch % MICRO_BATCHES:
        raise ValueError(f"settings.batch must be a multiple of {MICRO_BATCHES} "
                         f"(micro-batches), got {s.batch}")
    corpora = package_corpora()
    g = torch.Generator().manual_seed(1234)
    val = []  # validation batches made like the training steps, from each package's val split
    for _ in range(s.eval_batches):
        parts = [domain_batch(corpora, "val", s.batch // MICRO_BATCHES, s.seq_len, g)
                 for _ in range(MICRO_BATCHES)]
        val.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    results = []
    for seed in seeds:
        for m in methods:
            torch.manual_seed(seed)
            model = Transformer(model_config(s, m))
            bias_update = None if m.gamma is None else partial(m.gamma_at, steps=s.steps)
            res = train(model, step_batches(corpora, s, seed, m.micro_batches), s.steps,
                        lr=s.lr, eval_batches=val, eval_every=max(1, s.steps // 10),
                        device=device, seed=seed, progress=progress,
                        desc=f"{m.name} seed {seed}", micro_batches=m.micro_batches,
                        bias_update=bias_update,
                        global_balance_coef=None if m.global_alpha is None
                        else m.global_alpha / s.top_k)
            layers = model.moe_layers()
            bias = [(layer.router.selection_bias.tolist() if m.gamma is not None
                     else [0.0] * s.num_experts) for layer in layers]
            row = {
                "method": m.name, "seed": seed, "val_loss": evaluate(model, val, device),
                "curve": res.history.dropna(subset=["val_loss"])[["step", "val_loss"]]
                .to_dict("list"),
                "max_violation": [[round(v, 4) for v in r] for r in res.max_violation.tolist()],
                "bias": [[round(v, 5) for v in b] for b in bias],
                "probe": package_probe(model, corpora, s.seq_len),
                "seconds": res.seconds,
            }
            if seed == seeds[0]:
                row["shares"] = [[[round(v, 4) for v in e] for e in layer] for layer in
                                 res.expert_share[::SHARE_EVERY].tolist()]
            results.append(row)
    return results


_RUN_KEYS = ("method", "seed", "val_loss", "max_violation", "seconds")


def _check_results(results: object) -> list[dict]:
    return cli.check_results(results, _RUN_KEYS, nonempty=True)


def mean_max_violation(run_result: dict, start: float = 0.0, stop: float = 1.0) -> float:
    """Mean MaxVio over the layers and over the training steps in ``[start, stop)`` (fractions
    of the run) of one result of :func:`run`."""
    check_type("run_result", run_result, dict)
    if "max_violation" not in run_result:
        raise ValueError("run_result must be a result of run(), misses 'max_violation'")
    check_real("start", start, 0.0, 1.0)
    check_real("stop", stop, 0.0, 1.0)
    rows = run_result["max_violation"]
    a, b = int(start * len(rows)), int(stop * len(rows))
    if b <= a:
        raise ValueError(f"start must be below stop and cover a step, got start={start}, "
                         f"stop={stop} over {len(rows)} steps")
    return statistics.fmean(v for r in rows[a:b] for v in r)


def summary(results: list[dict]) -> dict:
    """The last-line JSON: per method the mean over seeds of the final validation loss, of the
    mean MaxVio over the last 20% of training steps, and of the probe's pooled MaxVio; the
    seeds."""
    _check_results(results)
    out: dict = {"val_loss": {}, "late_max_violation": {}, "probe_max_violation": {}}
    for name in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == name]
        out["val_loss"][name] = statistics.fmean(r["val_loss"] for r in rows)
        out["late_max_violation"][name] = statistics.fmean(
            mean_max_violation(r, 0.8) for r in rows)
        if all("probe" in r for r in rows):
            out["probe_max_violation"][name] = statistics.fmean(
                v for r in rows for v in r["probe"]["max_violation"])
    out["seeds"] = sorted({r["seed"] for r in results})
    return out


def format_runs(results: list[dict]) -> str:
    """One line per run: method, seed, validation loss, MaxVio (last 20% of steps), seconds."""
    _check_results(results)
    lines = [f"{'method':<22}{'seed':>5}{'val loss':>10}{'MaxVio':>8}{'time s':>9}"]
    for r in results:
        lines.append(f"{r['method']:<22}{r['seed']:>5}{r['val_loss']:>10.4f}"
                     f"{mean_max_violation(r, 0.8):>8.3f}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.loss_free --help``)."""
    p = cli.experiment_parser("loss_free", __doc__, seeds=[0, 1, 2], settings_help=(
        "e.g. --set d_model=128 n_heads=8: fields of moe_vs_dense.Settings"))
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"methods to run (default: all of {', '.join(METHOD_NAMES)})")
    args = p.parse_args(argv)
    s, seeds, device = cli.settings_from_args(p, args, QUICK, FULL)
    names = METHOD_NAMES if args.methods is None else args.methods
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        p.error(f"--methods takes names among {list(METHOD_NAMES)}, got {unknown}")
    try:
        methods = _check_methods([METHODS[METHOD_NAMES.index(n)] for n in names])
    except (TypeError, ValueError) as err:
        p.error(str(err))
    clock = cli.Clock()
    results = run(s, seeds, tuple(methods), device, progress=not args.no_progress)
    print(format_runs(results))
    if args.out:
        cli.write_results(args.out, "loss_free", argv, device, s, clock, results,
                          summary(results), methods=[m.__dict__ for m in methods],
                          n_group=N_GROUP, topk_group=TOPK_GROUP, micro_batches=MICRO_BATCHES,
                          share_every=SHARE_EVERY, probe_windows=PROBE_WINDOWS,
                          packages=list(LM_PACKAGES))
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
