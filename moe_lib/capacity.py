"""Expert capacity with token dropping (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021).

Each expert has C slots; the assignments past them are dropped (the token is carried by the
residual connection around the layer). C is a factor of the fair share, C = ceil(cf * n * k /
E) for n tokens, or a whole number of slots. Capacity applies to the pooled batch, or per group
(per sequence, as in GShard and Hugging Face's Switch Transformers), each group with its own C.
"""

from __future__ import annotations

import math

import torch

from moe_lib.checks import check_bool, check_int, check_positive, check_positive_int, check_type
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


def apply_capacity(
    routing: Routing,
    capacity_factor: float | None = None,
    *,
    capacity: int | None = None,
    per_group: bool = False,
) -> Routing:
    """Keep at most C assignments per expert (per group with ``per_group``); mark the rest
    dropped.

    ``capacity_factor``: C = ceil(cf * n * k / E) with n the tokens of the batch (or of the
    group); ``capacity``: C as a whole number of slots (>= 0). Give at most one; neither is
    dropless (the routing comes back unchanged). ``per_group``: every group of
    ``routing.groups`` (a sequence) has its own C slots per expert, as in GShard and Switch.

    Priority: every first choice is served before any second choice, and within a slot
    earlier tokens come first. Only selected assignments queue (expert choice's unselected pairs
    never run). A dropped assignment contributes nothing to the output.
    """
    check_type("routing", routing, Routing)
    if capacity_factor is not None and capacity is not None:
        raise ValueError("give capacity_factor or capacity (a number of slots), not both")
    if capacity_factor is not None:
        check_positive("capacity_factor", capacity_factor)
    if capacity is not None:
        check_int("capacity", capacity, low=0)
    check_bool("per_group", per_group)
    if capacity_factor is None and capacity is None:
        return routing
    T, k = routing.expert_ids.shape
    E = routing.num_experts
    grouped = per_group and routing.groups is not None
    groups = routing.groups if grouped else torch.zeros(T, dtype=torch.long,
                                                        device=routing.expert_ids.device)
    G = routing.num_groups if grouped else 1
    chosen = routing.chosen.t().reshape(-1)  # [k*T] slot-major: all first choices first
    # queue of each assignment: (group, expert); unchosen ones go to a queue of their own
    queue = groups.repeat(k) * E + routing.expert_ids.t().reshape(-1)  # [k*T]
    queue = torch.where(chosen, queue, G * E)
    order = torch.argsort(queue, stable=True)  # groups by queue, keeps the priority order
    counts = torch.bincount(queue, minlength=G * E + 1)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each queue
    rank_sorted = torch.arange(queue.numel(), device=queue.device) - starts[queue[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted  # position of each assignment in its queue
    if capacity is not None:
        limit = torch.full((G,), capacity, device=queue.device)
    else:
        sizes = torch.bincount(groups, minlength=G).tolist()
        limit = torch.tensor([expert_capacity(capacity_factor, n, k, E) for n in sizes],
                             device=queue.device)
    kept = (rank < limit[groups.repeat(k)]) & chosen
    return routing.with_kept(kept.view(k, T).t())  # [T, k]
