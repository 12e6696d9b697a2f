"""Moving token copies to their experts and the results back ("dispatch" and "combine").

Two implementations with the same result (up to float rounding):

- :func:`dispatch_loop`: the reference, one expert at a time; easy to follow line by line.
- :func:`dispatch_sorted`: sort the ``T * k`` token copies by expert once, run each expert on a
  contiguous slice, and put the results back with the inverse permutation.

Both read a :class:`~moe_lib.routing.Routing` and return ``y: [T, d_model]`` with
y_t = sum_j w_tj * kept_tj * E_{e_tj}(x_t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lib.experts import ExpertBank
from moe_lib.routing import Routing

DISPATCH_KINDS = ("loop", "sorted")


def dispatch_loop(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Reference dispatch: for each expert, gather its tokens, run it, add the weighted result.

    ``x: [T, d_model] -> [T, d_model]``.
    """
    y = torch.zeros_like(x)
    weights = routing.kept_weights.to(x.dtype)  # [T, k], 0 where dropped
    for e in range(experts.num_experts):
        token_idx, slot = torch.where((routing.expert_ids == e) & routing.kept)  # [n_e] each
        if token_idx.numel() == 0:
            continue
        out = experts.forward_expert(e, x[token_idx])  # [n_e, d_model]
        y = y.index_add(0, token_idx, out * weights[token_idx, slot, None])
    return y


def sort_by_expert(routing: Routing) -> tuple[Tensor, Tensor, list[int]]:
    """Order the kept token copies by expert.

    Returns ``(order, inverse, counts)``: ``order: [T*k]`` indexes the flattened ``[T*k]``
    assignments so that kept ones come first, grouped by expert (dropped ones last);
    ``inverse`` is its inverse permutation; ``counts[e]`` kept copies for expert e.
    """
    E = routing.num_experts
    flat_ids = routing.expert_ids.reshape(-1)  # [T*k]
    keys = torch.where(routing.kept.reshape(-1), flat_ids, E)  # dropped copies sort last
    order = torch.argsort(keys, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, routing.tokens_per_expert.tolist()


def dispatch_sorted(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Fast dispatch: permute token copies by expert, run contiguous slices, unpermute, combine.

    ``x: [T, d_model] -> [T, d_model]``.
    """
    T, k = routing.expert_ids.shape
    order, inverse, counts = sort_by_expert(routing)
    n_kept = sum(counts)
    token_of_copy = order[:n_kept] // k  # [n_kept] source token of each sorted copy
    out_sorted = experts.forward_slices(x[token_of_copy], counts)  # [n_kept, d_model]
    dropped_rows = out_sorted.new_zeros(T * k - n_kept, x.shape[-1])
    out = torch.cat([out_sorted, dropped_rows])[inverse]  # [T*k, d_model] back in token order
    weights = routing.kept_weights.to(x.dtype)  # [T, k]
    return torch.einsum("tkd,tk->td", out.view(T, k, x.shape[-1]), weights)


def dispatch_dense(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Dense gating: every expert on every token, mixed by the gate weights. ``[T, d] -> [T, d]``."""
    outs = experts.forward_all(x)  # [E, T, d_model]
    gates = routing.gates(kept_only=True).to(x.dtype)  # [T, E]
    return torch.einsum("etd,te->td", outs, gates)


DISPATCHERS = {"loop": dispatch_loop, "sorted": dispatch_sorted}
