"""Routing statistics for tables, heatmaps and training logs, all read from Routing records.

Nothing here is a loss (see :mod:`moe_lib.losses`) and nothing draws (see :mod:`moe_lib.plot`):
these are the numbers that plots, the training loop and the chapters report. ``E`` experts,
``T`` tokens, ``k`` assignments per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moe_lib.checks import check_bool, check_positive_int, check_tensor, check_type
from moe_lib.routing import Routing

_EPS = 1e-10


def expert_shares(routing: Routing, kept_only: bool = True) -> Tensor:
    """``[E]`` share of the assignments that each expert received (sums to 1; 1/E each when
    perfectly balanced; all 0 when there are none).

    ``kept_only=True``: the assignments capacity kept; False: what the router chose.
    """
    check_type("routing", routing, Routing)
    check_bool("kept_only", kept_only)
    counts = (routing.tokens_per_expert if kept_only else routing.chosen_counts()).float()
    return counts / counts.sum().clamp_min(1.0)


def load_cv(routing: Routing) -> float:
    """Coefficient of variation std / mean of the kept assignments per expert (0 when balanced).

    A table statistic, not a loss: it carries no gradient.
    """
    check_type("routing", routing, Routing)
    counts = routing.tokens_per_expert.float()
    return float(counts.std(unbiased=False) / counts.mean().clamp_min(_EPS))


def max_violation(routing: Routing) -> float:
    """Maximal violation of balance, max_i load_i / mean_i load_i - 1 (0 when balanced), over the
    kept assignments (DeepSeek-V3's MaxVio; Wang et al. 2024)."""
    check_type("routing", routing, Routing)
    counts = routing.tokens_per_expert.float()
    return float(counts.max() / counts.mean().clamp_min(_EPS) - 1) if counts.sum() > 0 else 0.0


def drop_rate(routing: Routing) -> float:
    """Fraction of the ``T * k`` assignments that capacity dropped (0 when dropless or empty)."""
    check_type("routing", routing, Routing)
    n = routing.kept.numel()
    return routing.dropped / n if n else 0.0


def _check_groups(routing: Routing, groups: Tensor, num_groups: int) -> Tensor:
    check_type("routing", routing, Routing)
    check_positive_int("num_groups", num_groups)
    check_tensor("groups", groups, kind="int")
    groups = groups.reshape(-1).to(routing.expert_ids.device)
    if groups.numel() != routing.num_tokens:
        raise ValueError(f"groups must have one label per token ({routing.num_tokens}), "
                         f"got {groups.numel()}")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(f"groups must hold labels in [0, {num_groups - 1}] (num_groups="
                         f"{num_groups}), got [{int(groups.min())}, {int(groups.max())}]")
    return groups.long()


def utilisation_by_group(routing: Routing, groups: Tensor, num_groups: int) -> Tensor:
    """``[num_groups, E]``: for each group of tokens, the share of its kept assignments per expert.

    ``groups: [T]`` integer label in ``[0, num_groups)`` of each token (a class, a region, a
    character type ...). Each row sums to 1 (rows of groups with no tokens are 0).
    """
    groups = _check_groups(routing, groups, num_groups)
    E = routing.num_experts
    flat = (groups[:, None] * E + routing.expert_ids).reshape(-1)[routing.kept.reshape(-1)]
    counts = torch.bincount(flat, minlength=num_groups * E).view(num_groups, E).float()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def mean_gate_by_group(routing: Routing, groups: Tensor, num_groups: int) -> Tensor:
    """``[num_groups, E]`` mean gate weight G(x)_i over the tokens of each group (0 for a group
    without tokens)."""
    groups = _check_groups(routing, groups, num_groups)
    gates = routing.gates(kept_only=True).detach().float()  # [T, E]
    sums = gates.new_zeros(num_groups, routing.num_experts).index_add(0, groups, gates)
    n = torch.bincount(groups, minlength=num_groups).clamp_min(1).float()
    return sums / n[:, None]


def shares_over_steps(routings: Sequence[Routing]) -> Tensor:
    """``[steps, E]`` share of kept assignments per expert, one row per recorded step."""
    if isinstance(routings, Routing) or not isinstance(routings, Sequence):
        raise TypeError("routings must be a sequence of Routing records, got "
                        f"{type(routings).__name__}")
    if not routings:
        raise ValueError("routings must hold at least one Routing record, got none")
    for i, r in enumerate(routings):
        check_type(f"routings[{i}]", r, Routing)
    return torch.stack([expert_shares(r).cpu() for r in routings])
