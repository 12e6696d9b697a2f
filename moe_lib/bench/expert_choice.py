"""Expert choice against token choice on chapter 7's classifier, paired over seeds.

The task is chapter 7's: which of six standard-library packages a 128-byte snippet of source
comes from (:func:`moe_lib.data.load_package_snippets`), with chapter 7's model (one pre-norm
transformer block, mean pooling, a linear head). Two arms differ only in the router of the MoE
layer:

- ``token_choice``: chapter 7's Switch layer: each token picks its top-1 expert, weighted by the
  raw softmax probability, ReLU experts, capacity factor 1.25 (C = ceil(1.25 T / E) slots per
  expert over the batch), router jitter 0.01, the Switch balance loss (alpha = 1e-2);
- ``expert_choice`` (Zhou et al. 2022): each expert takes the C = ceil(c T / E) tokens of the
  batch with its largest softmax scores, c = 1 (so E C = T token-expert pairs per batch: one
  expert per token on average, the compute of top-1), weighted by the score; no balance loss
  and no capacity overflow (balance holds by construction).

For a seed, both arms start from the same weights (the expert-choice layer is loaded with the
token-choice layer's router and experts; everything else is built from the same seed) and see the
same batches. The test set is scored in batches of the training batch size, in a fixed random
order (batches then mix packages, as in training), and once more in the stored order (batches of
one package): expert choice, and capacity in token choice, route over the whole batch, so a
snippet's prediction may depend on the other snippets of its batch; the run records how many
predictions change.

    python -m moe_lib.bench.expert_choice --quick --out expert_choice.json

One line per run, then, as the last line, a JSON summary: the mean test accuracy per arm and the
per-seed differences (expert choice minus token choice). Needs the ``book`` extra (pandas,
tqdm) for :mod:`moe_lib.train`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from moe_lib.bench import cli
from moe_lib.checks import (
    check_bool,
    check_int,
    check_positive,
    check_positive_int,
    check_real,
    check_tensor,
    check_type,
)
from moe_lib.data import (
    CLASSIFIER_PACKAGES,
    SPLITS,
    load_package_snippets,
    package_files,
    read_bytes,
    split_bounds,
)
from moe_lib.layer import MoE
from moe_lib.models import Transformer, TransformerConfig
from moe_lib.runtime import as_device, available_device
from moe_lib.train import train

ARMS = ("token_choice", "expert_choice")
ORDER_SEED = 1234  # the fixed random order in which the test set is scored


@dataclass(frozen=True)
class Settings:
    """Chapter 7's model and training, and the two routers' capacity factors.

    ``snippet_len`` bytes per snippet; ``d_model``, ``n_heads`` (dividing d_model),
    ``d_hidden`` (each expert's hidden width), ``experts``; ``token_capacity_factor``
    (token choice, > 0) and ``expert_capacity_factor`` (expert choice's c, > 0: experts per
    token on average); ``dropout`` in [0, 1); ``lr`` and ``weight_decay`` (AdamW);
    ``batch`` snippets per step, ``steps``, ``eval_every`` (steps between validation losses).
    """

    snippet_len: int = 128
    d_model: int = 64
    n_heads: int = 4
    d_hidden: int = 64
    experts: int = 8
    token_capacity_factor: float = 1.25
    expert_capacity_factor: float = 1.0
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 0.05
    batch: int = 32
    steps: int = 1200
    eval_every: int = 200

    def __post_init__(self) -> None:
        for name in ("snippet_len", "d_model", "n_heads", "d_hidden", "experts", "batch",
                     "steps", "eval_every"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model={self.d_model}, got {self.n_heads}")
        for name in ("token_capacity_factor", "expert_capacity_factor", "lr"):
            check_positive(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        check_real("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_real("weight_decay", self.weight_decay, 0.0)

    def to_dict(self) -> dict:
        """The fields as a dict (what ``--out`` files record under ``meta.settings``)."""
        return asdict(self)


QUICK = Settings()
FULL = Settings(batch=64)


def model_config(settings: Settings) -> TransformerConfig:
    """Chapter 7's classifier with its Switch layer (the token-choice arm)."""
    check_type("settings", settings, Settings)
    s = settings
    switch = dict(num_experts=s.experts, top_k=1, router="topk", weighting="raw", expert="relu",
                  capacity_factor=s.token_capacity_factor, jitter_eps=0.01,
                  balance_loss="switch")
    return TransformerConfig(
        vocab_size=256, seq_len=s.snippet_len, d_model=s.d_model, n_layers=1,
        n_heads=s.n_heads, d_hidden=s.d_hidden, ffn="moe", task="classify",
        num_classes=len(CLASSIFIER_PACKAGES), dropout=s.dropout, moe=switch)


def build(arm: str, settings: Settings, seed: int) -> Transformer:
    """The model of ``arm`` for ``seed``: the two arms share every initial weight.

    The expert-choice model is the token-choice model with each MoE layer replaced by
    ``MoE(router="expert_choice", capacity_factor=c)`` loaded with the replaced layer's router
    and expert weights (the two layers have the same tensors).
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    check_type("settings", settings, Settings)
    check_int("seed", seed, low=0, high=2**32 - 1)
    torch.manual_seed(seed)
    model = Transformer(model_config(settings))
    if arm == "expert_choice":
        for block in model.blocks:
            old = block.ffn
            block.ffn = MoE(settings.d_model, settings.d_hidden, settings.experts,
                            router="expert_choice", expert="relu",
                            capacity_factor=settings.expert_capacity_factor)
            block.ffn.load_state_dict(old.state_dict())
    return model


def snippet_files(split: str, packages: tuple[str, ...] = CLASSIFIER_PACKAGES,
                  snippet_len: int = 128) -> Tensor:
    """``[n]`` int64: the source file (numbered over all packages, in order) of every snippet of
    ``split``, in the order of :func:`moe_lib.data.load_package_snippets` (the same walk over
    the files: for the bootstrap over files, whose snippets are correlated)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(packages, str) or not isinstance(packages, (tuple, list)) or not packages:
        raise TypeError(f"packages must be a non-empty tuple of package names, got "
                        f"{packages!r:.60}")
    check_positive_int("snippet_len", snippet_len)
    ids, file_index = [], 0
    for package in packages:
        for path in package_files(package):
            n = len(read_bytes(path)) // snippet_len
            if n == 0:
                continue
            a, b = split_bounds(n)[split]
            ids.append(torch.full((b - a,), file_index, dtype=torch.long))
            file_index += 1
    return torch.cat(ids)


def experts_per_token(selected: Tensor) -> Tensor:
    """``selected: [T, E]`` bool (the pairs the experts took) -> ``[E + 1]`` int64: how many
    tokens got 0, 1, ..., E experts."""
    check_tensor("selected", selected, dims=2, kind="bool")
    E = selected.shape[1]
    return torch.bincount(selected.sum(dim=1), minlength=E + 1)


@torch.no_grad()
def score(model: Transformer, x: Tensor, y: Tensor, batch: int, order: Tensor,
          device: torch.device | str = "cpu") -> dict:
    """Score ``model`` on ``x: [n, L]``, ``y: [n]`` in batches of ``batch`` snippets taken in
    ``order`` (a permutation of ``range(n)``). Returns ``pred: [n]`` (in the original order),
    ``experts_per_token: [E + 1]`` over all tokens (from the experts each token was processed
    by, after capacity) and ``dropped`` (the share of chosen assignments capacity dropped)."""
    check_type("model", model, Transformer)
    check_tensor("x", x, dims=2, kind="int")
    check_tensor("y", y, dims=1, kind="int", shape=(x.shape[0],))
    check_positive_int("batch", batch)
    check_tensor("order", order, dims=1, kind="int", shape=(x.shape[0],))
    if not torch.equal(order.sort().values, torch.arange(x.shape[0])):
        raise ValueError("order must be a permutation of range(n)")
    device = as_device(device)
    model.eval()
    pred = torch.empty_like(y)
    E = model.moe_layers()[0].num_experts
    hist = torch.zeros(E + 1, dtype=torch.long)
    chosen = dropped = 0
    for rows in order.split(batch):
        out = model(x[rows].to(device))
        pred[rows] = out.logits.argmax(dim=1).cpu()
        for r in out.routings:
            kept = r.gates(kept_only=True) > 0  # [T, E] the experts each token ran through
            hist += experts_per_token(kept.cpu())
            chosen += int(r.chosen.sum())
            dropped += r.dropped
    return {"pred": pred, "experts_per_token": hist, "dropped": dropped / max(chosen, 1)}


def _bits(mask: Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.tolist())


def bits_to_mask(bits: str) -> Tensor:
    """``"0110..."`` (as stored in the results) -> ``[n]`` bool."""
    check_type("bits", bits, str)
    if set(bits) - {"0", "1"}:
        raise ValueError("bits must hold only the characters 0 and 1")
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def run(settings: Settings, seeds: list[int], device: torch.device | str = "cpu",
        progress: bool = True) -> list[dict]:
    """Train both arms with every seed; one result dict per run, in the order seed, arm.

    A result holds ``arm``, ``seed``, ``test_accuracy`` (shuffled-order batches),
    ``test_correct`` (a string of 0/1, one per test snippet in the stored order),
    ``test_accuracy_sorted`` and ``changed_by_order`` (predictions that differ when the test
    batches hold one package each), ``val_accuracy``, ``experts_per_token`` (``[E + 1]`` token
    counts on the test set), ``dropped``, ``seconds`` (training, wall clock) and ``curve``
    (``{"step": [...], "val_loss": [...]}``).
    """
    check_type("settings", settings, Settings)
    seeds = cli.check_seeds(seeds)
    device = available_device(device)
    check_bool("progress", progress)
    s = settings
    data = load_package_snippets(snippet_len=s.snippet_len)
    n_test = data.y["test"].numel()
    shuffled = torch.randperm(n_test, generator=torch.Generator().manual_seed(ORDER_SEED))
    stored = torch.arange(n_test)
    val_order = torch.arange(data.y["val"].numel())
    val_batches = list(zip(data.x["val"].split(256), data.y["val"].split(256)))
    results = []
    for seed in seeds:
        for arm in ARMS:
            model = build(arm, s, seed)
            gen = torch.Generator().manual_seed(seed)  # the same batches for both arms

            def next_batch(step: int, gen: torch.Generator = gen) -> tuple[Tensor, Tensor]:
                i = torch.randint(0, data.x["train"].shape[0], (s.batch,), generator=gen)
                return data.x["train"][i], data.y["train"][i]

            res = train(model, next_batch, s.steps, lr=s.lr, weight_decay=s.weight_decay,
                        eval_batches=val_batches, eval_every=s.eval_every, device=device,
                        seed=seed, progress=progress, desc=f"{arm} seed {seed}")
            test = score(model, data.x["test"], data.y["test"], s.batch, shuffled, device)
            by_package = score(model, data.x["test"], data.y["test"], s.batch, stored, device)
            val = score(model, data.x["val"], data.y["val"], s.batch, val_order, device)
            correct = test["pred"] == data.y["test"]
            results.append({
                "arm": arm, "seed": seed,
                "test_accuracy": float(correct.float().mean()),
                "test_correct": _bits(correct),
                "test_accuracy_sorted": float((by_package["pred"] == data.y["test"])
                                              .float().mean()),
                "changed_by_order": int((by_package["pred"] != test["pred"]).sum()),
                "val_accuracy": float((val["pred"] == data.y["val"]).float().mean()),
                "experts_per_token": test["experts_per_token"].tolist(),
                "dropped": test["dropped"],
                "seconds": res.seconds,
                "curve": res.history.dropna(subset=["val_loss"])[["step", "val_loss"]]
                .to_dict("list"),
            })
    return results


_RUN_KEYS = ("arm", "seed", "test_accuracy", "test_correct", "seconds")


def _check_results(results: object) -> list[dict]:
    return cli.check_results(results, _RUN_KEYS)


def paired_accuracies(results: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """The seeds run with both arms, and the token-choice and expert-choice test accuracies
    of each, in seed order."""
    _check_results(results)
    acc = {(r["arm"], r["seed"]): r["test_accuracy"] for r in results}
    seeds = sorted({seed for arm, seed in acc if (ARMS[0], seed) in acc and (ARMS[1], seed) in acc})
    if not seeds:
        raise ValueError("results must hold both arms for at least one seed")
    return (seeds, [acc[(ARMS[0], s)] for s in seeds], [acc[(ARMS[1], s)] for s in seeds])


def summary(results: list[dict]) -> dict:
    """The last-line JSON: mean test accuracy per arm, the per-seed differences expert choice
    minus token choice (``diffs``) and their mean, and the seeds."""
    seeds, tc, ec = paired_accuracies(results)
    diffs = [e - t for t, e in zip(tc, ec)]
    return {"token_choice_accuracy": sum(tc) / len(tc),
            "expert_choice_accuracy": sum(ec) / len(ec),
            "diffs": diffs, "mean_diff": sum(diffs) / len(diffs), "seeds": seeds}


def format_runs(results: list[dict]) -> str:
    """One line per run: arm, seed, test accuracy (shuffled and one-package batches),
    predictions changed by the order, dropped share, training seconds."""
    _check_results(results)
    lines = [f"{'arm':<15}{'seed':>5}{'test acc':>10}{'sorted':>9}{'changed':>9}"
             f"{'dropped':>9}{'time s':>9}"]
    for r in results:
        lines.append(f"{r['arm']:<15}{r['seed']:>5}{r['test_accuracy']:>10.4f}"
                     f"{r.get('test_accuracy_sorted', float('nan')):>9.4f}"
                     f"{r.get('changed_by_order', -1):>9}{r.get('dropped', float('nan')):>9.3f}"
                     f"{r['seconds']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.expert_choice --help``)."""
    p = cli.experiment_parser("expert_choice", __doc__, seeds=[0, 1, 2, 3, 4], settings_help=(
        "e.g. --set d_model=32 batch=16: fields of Settings"))
    args = p.parse_args(argv)
    s, seeds, device = cli.settings_from_args(
        p, args, QUICK, FULL,
        with_steps=lambda s, n: replace(s, steps=n, eval_every=min(s.eval_every, n)))
    clock = cli.Clock()
    results = run(s, seeds, device, progress=not args.no_progress)
    print(format_runs(results))
    if args.out:
        cli.write_results(args.out, "expert_choice", argv, device, s, clock, results,
                          summary(results), arms=list(ARMS), order_seed=ORDER_SEED)
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
