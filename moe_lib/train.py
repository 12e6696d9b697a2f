"""A minimal training loop: AdamW, aux losses added, periodic evaluation, tqdm progress,
history as a pandas DataFrame and routing statistics per layer per step for heatmaps.

Needs the ``book`` extra (pandas, tqdm): ``pip install "moe_lib[book]"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
from moe_lib.losses import switch_loss
from moe_lib.models import ModelOutput, Transformer
from moe_lib.routing import concat_routings
from moe_lib.runtime import as_device, import_extra, seed_everything
from moe_lib.stats import drop_rate, expert_shares, max_violation

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
    ``expert_share``: ``[steps, layers, E]`` share of kept assignments per expert at each step
    (all micro-batches of the step pooled). ``dropped``: ``[steps, layers]`` fraction of
    assignments dropped by capacity. ``max_violation``: ``[steps, layers]`` max load / mean load
    - 1 of the step's kept assignments (0 when balanced)."""

    history: pd.DataFrame
    expert_share: Tensor
    dropped: Tensor
    seconds: float
    max_violation: Tensor = field(default_factory=lambda: torch.empty(0))


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
    micro_batches: int = 1,
    bias_update: float | Callable[[int], float] | None = None,
    global_balance_coef: float | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` steps; ``next_batch(i) -> (x, y)`` supplies the data.

    The loss minimised is task loss + the model's aux loss (balancing and z losses, already
    weighted by each MoE layer). ``eval_batches`` are evaluated every ``eval_every`` steps and
    after the last step. The learning rate warms up linearly over the first 5% of steps.

    - ``micro_batches``: gradient accumulation; step s runs ``next_batch(s * m + i)`` for
      i < m and averages their losses (m = 1: ``next_batch(step)``).
    - ``bias_update``: DeepSeek-V3's loss-free balancing: after each optimizer step, every MoE
      layer (built with ``selection_bias=True``) moves its selection bias by gamma, a number or
      a schedule ``step -> gamma`` (0 freezes it); the counts pool all micro-batches of a step.
    - ``global_balance_coef``: the global-batch Switch loss (Qwen): for each layer, f from the
      counts pooled over the step's micro-batches, P from each micro-batch, weighted by this
      coefficient (the layers must have no balance loss of their own). All micro-batches'
      forward passes then run before the backward pass (m graphs held at once).
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
    check_positive_int("micro_batches", micro_batches)
    if bias_update is not None:
        if not callable(bias_update):
            check_nonnegative("bias_update", bias_update)
        layers = model.moe_layers()
        if not layers or not all(m.config.selection_bias for m in layers):
            raise ValueError("bias_update needs MoE layers built with selection_bias=True")
    if global_balance_coef is not None:
        check_nonnegative("global_balance_coef", global_balance_coef)
        if any(m.config.balance_loss is not None for m in model.moe_layers()):
            raise ValueError("global_balance_coef replaces the layers' own balance loss: build "
                             "them with balance_loss=None")
        if not model.moe_layers():
            raise ValueError("global_balance_coef needs a model with MoE layers")
    device = as_device(device)

    seed_everything(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rows, shares, dropped, violations = [], [], [], []
    start = time.perf_counter()
    # At most one refresh a second: in a notebook each refresh is a widget message, and a long
    # cell that sends more than ~1000 of them overflows the kernel's IOPub queue (nbval then
    # misses the end of the cell and fails it).
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss, aux, routings = _step(model, next_batch, step, micro_batches, global_balance_coef,
                                    device)
        opt.step()
        sched.step()
        if bias_update is not None:
            model.update_selection_bias(bias_update(step) if callable(bias_update)
                                        else bias_update)
        row = {"step": step, "loss": loss, "aux_loss": aux}
        if routings:
            shares.append(torch.stack([expert_shares(r) for r in routings]).cpu())  # [L, E]
            dropped.append(torch.tensor([drop_rate(r) for r in routings]))  # [L]
            violations.append(torch.tensor([max_violation(r) for r in routings]))  # [L]
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
        max_violation=torch.stack(violations) if violations else torch.empty(0),
    )


def _step(model: Transformer, next_batch: Callable[[int], Batch], step: int, m: int,
          global_coef: float | None, device: torch.device) -> tuple[float, float, list]:
    """Forward and backward of one optimizer step over ``m`` micro-batches; returns the task
    loss, the aux loss and, per MoE layer, one Routing record of the step (micro-batches
    pooled)."""
    if m == 1 and global_coef is None:
        x, y = (t.to(device) for t in next_batch(step))
        out = model(x)
        loss = task_loss(out, y)
        (loss + out.aux_loss).backward()
        return loss.item(), out.aux_loss.item(), out.routings
    keep_graphs = global_coef is not None  # the global loss needs every micro-batch's P
    outs, total, aux_total = [], 0.0, 0.0
    pending = []
    for i in range(m):
        x, y = (t.to(device) for t in next_batch(step * m + i))
        out = model(x)
        loss = task_loss(out, y) / m
        aux = out.aux_loss / m
        if keep_graphs:
            pending.append(loss + aux)
        else:
            (loss + aux).backward()
        total += loss.item()
        aux_total += aux.item()
        outs.append(out)
    layers = list(zip(*(o.routings for o in outs)))  # [L][m] Routing records
    if keep_graphs:
        extra = 0.0
        for rs in layers:
            counts = sum(r.chosen_counts() for r in rs)
            tokens = sum(r.num_tokens for r in rs)
            extra = extra + sum(switch_loss(r, global_counts=counts, global_tokens=tokens)
                                for r in rs) / m
        extra = global_coef * extra
        (sum(pending) + extra).backward()
        aux_total += float(extra.detach())
    return total, aux_total, [concat_routings(list(rs)) for rs in layers]
