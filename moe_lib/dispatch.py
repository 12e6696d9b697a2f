"""Moving token copies to their experts and the results back ("dispatch" and "combine").

Two implementations with the same result (up to float rounding):

- :func:`dispatch_loop`: the reference, one expert at a time; easy to follow line by line.
- :func:`dispatch_sorted`: sort the ``T * k`` token copies by expert once, run each expert on a
  contiguous slice, and put the results back with the inverse permutation. Its gradients are
  gathers too (see :mod:`moe_lib.permute`), never scatters.

Both read a :class:`~moe_lib.routing.Routing` and return ``y: [T, d_model]`` with
y_t = sum_j w_tj * kept_tj * E_{e_tj}(x_t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lib.experts import ExpertBank
from moe_lib.permute import make_permutation, permute, unpermute_combine
from moe_lib.routing import Routing

DISPATCH_KINDS = ("loop", "sorted")


def dispatch_loop(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Reference dispatch: for each expert, gather its tokens, run it, add the weighted result.

    ``x: [T, d_model] -> [T, d_model]``.
    """
    if x.shape[0] == 0:
        return x * 0  # empty, but still part of the graph so that backward works
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
    counts = routing.tokens_per_expert.tolist()  # the one host sync: slice sizes
    E = routing.num_experts
    keys = routing.expert_ids.reshape(-1)  # [T*k]
    if sum(counts) < keys.numel():  # some copies were dropped: key E sorts them last
        keys = torch.where(routing.kept.reshape(-1), keys, E)
    # the narrowest integer type that holds 0..E: 1-byte keys sort ~3x faster than int64 on a CPU
    key_dtype = torch.uint8 if E < 256 else torch.int16 if E < 2**15 else torch.int32
    order = torch.argsort(keys.to(key_dtype), stable=True)  # [T*k]; stable: token order kept
    positions = torch.arange(order.numel(), device=order.device)
    inverse = torch.empty_like(order).scatter_(0, order, positions)  # inverse[order[i]] = i
    return order, inverse, counts


def dispatch_sorted(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Fast dispatch: permute token copies by expert, run contiguous slices, unpermute, combine.

    ``x: [T, d_model] -> [T, d_model]``. Three steps, each with a hand-written backward
    (:mod:`moe_lib.permute`, :meth:`moe_lib.experts.ExpertBank.forward_slices`):

    1. ``xs = x[src]``: the ``n`` kept copies sorted by expert (``[n, d_model]``);
    2. every expert on its contiguous slice (``[n, d_model]``): block by block on a CPU, one
       grouped GEMM per projection on a GPU;
    3. ``y[t] = sum_j w[t, j] * out[pos[t, j]]``: unpermute and combine in one weighted gather.

    The only host synchronisation is ``counts`` (the slice sizes) in :func:`sort_by_expert`.
    """
    perm = make_permutation(*sort_by_expert(routing), routing.top_k)
    out = experts.forward_slices(permute(x, perm), perm.counts)  # [n, d_model]
    # nothing dropped: kept_weights == weights, without the multiply by the mask
    weights = routing.kept_weights if perm.has_dropped else routing.weights  # [T, k]
    return unpermute_combine(out, weights.to(x.dtype), perm)


def dispatch_dense(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Dense gating: every expert on every token, mixed by the gate weights: ``[T, d] -> [T, d]``.

    Used by ``router="dense"``.
    """
    outs = experts.forward_all(x)  # [E, T, d_model]
    gates = routing.gates(kept_only=True).to(x.dtype)  # [T, E]
    return torch.einsum("etd,te->td", outs, gates)


DISPATCHERS = {"loop": dispatch_loop, "sorted": dispatch_sorted}
