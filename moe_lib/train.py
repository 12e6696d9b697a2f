"""A minimal training loop: AdamW, aux losses added, periodic evaluation, tqdm progress,
history as a pandas DataFrame and routing statistics per layer per step for heatmaps.

Needs the ``book`` extra (pandas, tqdm): ``pip install "moe_lib[book]"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lib.checks import (
    check_bool,
    check_int,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_tensor,
    check_type,
)
from moe_lib.models import ModelOutput, Transformer
from moe_lib.runtime import as_device, import_extra, seed_everything
from moe_lib.stats import drop_rate, expert_shares

pd = import_extra("pandas", "book")
tqdm = import_extra("tqdm.auto", "book").tqdm

Batch = tuple[Tensor, Tensor]


def task_loss(out: ModelOutput, y: Tensor) -> Tensor:
    """Cross-entropy: per byte for a language model (``y: [B, S]``), per sequence (``y: [B]``)
    for a classifier."""
    check_type("out", out, ModelOutput)
    check_tensor("y", y, kind="int", device=out.logits.device)
    if y.numel() * out.logits.shape[-1] != out.logits.numel():
        raise ValueError(f"y must hold one target per row of logits {tuple(out.logits.shape)}, "
                         f"got shape {tuple(y.shape)}")
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1))


@dataclass
class TrainResult:
    """``history``: one row per step (``step, loss, aux_loss``; ``val_loss`` on evaluation steps).
    ``expert_share``: ``[steps, layers, E]`` share of kept assignments per expert at each step.
    ``dropped``: ``[steps, layers]`` fraction of assignments dropped by capacity."""

    history: pd.DataFrame
    expert_share: Tensor
    dropped: Tensor
    seconds: float


@torch.no_grad()
def evaluate(model: Transformer, batches: list[Batch], device: torch.device | str) -> float:
    """Mean task loss over ``batches`` in eval mode (aux losses excluded)."""
    check_type("model", model, Transformer)
    _check_batches("batches", batches)
    device = as_device(device)
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        total += float(task_loss(model(x.to(device)), y.to(device)))
    model.train(was_training)
    return total / len(batches)


def _check_batches(name: str, batches: object) -> None:
    if not isinstance(batches, (list, tuple)):
        raise TypeError(f"{name} must be a list of (x, y) tensor pairs, got "
                        f"{type(batches).__name__}")
    if not batches:
        raise ValueError(f"{name} must hold at least one (x, y) batch, got none")
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise TypeError(f"{name}[{i}] must be an (x, y) pair of tensors, got "
                            f"{type(b).__name__}")


def train(
    model: Transformer,
    next_batch: Callable[[int], Batch],
    steps: int,
    lr: float = 3e-3,
    eval_batches: list[Batch] | None = None,
    eval_every: int = 50,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` for ``steps`` steps; ``next_batch(step) -> (x, y)`` supplies the data.

    The loss minimised is task loss + the model's aux loss (balancing and z losses, already
    weighted by each MoE layer). ``eval_batches`` are evaluated every ``eval_every`` steps and
    after the last step. The learning rate warms up linearly over the first 5% of steps.
    """
    check_type("model", model, Transformer)
    if not callable(next_batch):
        raise TypeError(f"next_batch must be callable, step -> (x, y), got "
                        f"{type(next_batch).__name__}")
    check_positive_int("steps", steps)
    check_positive("lr", lr)
    if eval_batches is not None:
        _check_batches("eval_batches", eval_batches)
    check_positive_int("eval_every", eval_every)
    check_nonnegative("weight_decay", weight_decay)
    check_int("seed", seed, low=0, high=2**32 - 1)
    check_bool("progress", progress)
    check_type("desc", desc, str)
    device = as_device(device)

    seed_everything(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rows, shares, dropped = [], [], []
    start = time.perf_counter()
    # At most one refresh a second: in a notebook each refresh is a widget message, and a long
    # cell that sends more than ~1000 of them overflows the kernel's IOPub queue (nbval then
    # misses the end of the cell and fails it).
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        x, y = (t.to(device) for t in next_batch(step))
        out = model(x)
        loss = task_loss(out, y)
        opt.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        opt.step()
        sched.step()
        row = {"step": step, "loss": loss.item(), "aux_loss": out.aux_loss.item()}
        if out.routings:
            shares.append(torch.stack([expert_shares(r) for r in out.routings]).cpu())  # [L, E]
            dropped.append(torch.tensor([drop_rate(r) for r in out.routings]))  # [L]
        if eval_batches and (step % eval_every == 0 or step == steps - 1):
            row["val_loss"] = evaluate(model, eval_batches, device)
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row['val_loss']:.3f}")
        rows.append(row)
    model.eval()
    return TrainResult(
        history=pd.DataFrame(rows),
        expert_share=torch.stack(shares) if shares else torch.empty(0),
        dropped=torch.stack(dropped) if dropped else torch.empty(0),
        seconds=time.perf_counter() - start,
    )
