"""Expert capacity with token dropping (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021)."""

from __future__ import annotations

import math

import torch

from moe_lib.checks import check_int, check_positive, check_positive_int, check_type
from moe_lib.routing import Routing


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: C = min(T, ceil(capacity_factor * T * k / E)).

    An expert never receives more than T assignments (a token's k experts are distinct), so a
    capacity above T changes nothing; capping it there also keeps a huge factor from overflowing.
    """
    check_positive("capacity_factor", capacity_factor)
    check_int("num_tokens", num_tokens, low=0)
    check_positive_int("top_k", top_k)
    check_positive_int("num_experts", num_experts)
    if top_k > num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if capacity_factor * top_k >= num_experts:  # C >= T: nothing can be dropped
        return num_tokens
    return min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(routing: Routing, capacity_factor: float | None) -> Routing:
    """Keep at most C assignments per expert; mark the rest as dropped.

    ``capacity_factor=None`` is dropless (the routing comes back unchanged). Otherwise every
    first choice is served before any second choice, and within a slot earlier tokens come
    first. A dropped assignment contributes nothing to the output: the token is carried by
    the residual connection around the layer.
    """
    check_type("routing", routing, Routing)
    if capacity_factor is None:
        return routing
    T, k = routing.expert_ids.shape
    E = routing.num_experts
    capacity = expert_capacity(capacity_factor, T, k, E)
    flat = routing.expert_ids.t().reshape(-1)  # [k*T] slot-major: all first choices first
    order = torch.argsort(flat, stable=True)  # groups by expert, keeps the priority order
    counts = torch.bincount(flat, minlength=E)
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted  # position of each assignment in its expert's queue
    kept = (rank < capacity).view(k, T).t()  # [T, k]
    return routing.with_kept(kept)
