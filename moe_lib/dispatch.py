"""Moving token copies to their experts and the results back ("dispatch" and "combine").

Three implementations with the same result (up to float rounding), chosen by ``MoE(dispatch=)``:

- :func:`dispatch_loop` ("loop"): the reference, one expert at a time; easy to follow line by
  line, and differentiable any number of times;
- :func:`dispatch_sorted` ("sorted"): sort the ``T * k`` token copies by expert once, run each
  expert on a contiguous slice, and put the results back with the inverse permutation; its
  gradients are gathers too (:mod:`moe_lib.permute`), never scatters;
- :func:`dispatch_dense` ("dense"): every expert on every token, mixed by the dense gate matrix
  (E / k times the expert FLOPs; the natural form of dense gating, ``router="dense"``).

Each reads a :class:`~moe_lib.routing.Routing` and returns ``y: [T, d_model]`` with
y_t = sum_j w_tj * kept_tj * E_{e_tj}(x_t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lib.checks import check_tensor, check_type
from moe_lib.experts import ExpertBank
from moe_lib.permute import Permutation, permute, unpermute_combine
from moe_lib.routing import Routing


def _check(x: Tensor, routing: Routing, experts: ExpertBank) -> None:
    check_type("routing", routing, Routing)
    check_type("experts", experts, ExpertBank)
    check_tensor("x", x, dims=2, kind="float", shape=(routing.num_tokens, experts.d_model),
                 device=experts.w_in.device)
    if routing.num_experts != experts.num_experts:
        raise ValueError(f"routing has {routing.num_experts} experts, the bank "
                         f"{experts.num_experts}")


def dispatch_loop(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Reference dispatch: for each expert, gather its tokens, run it, add the weighted result.

    ``x: [T, d_model] -> [T, d_model]``.
    """
    _check(x, routing, experts)
    if x.shape[0] == 0:
        return x * 0  # empty, but still part of the graph so that backward works
    y = torch.zeros_like(x)
    weights = routing.kept_weights.to(x.dtype)  # [T, k], 0 where dropped
    for e in range(experts.num_experts):
        token_idx, slot = torch.where((routing.expert_ids == e) & routing.kept)  # [n_e] each
        if token_idx.numel() == 0:
            continue
        out = experts.forward_expert(e, x[token_idx])  # [n_e, d_model]
        y = y.index_add(0, token_idx, (out * weights[token_idx, slot, None]).to(x.dtype))
    return y


def dispatch_sorted(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Fast dispatch: permute token copies by expert, run contiguous slices, unpermute, combine.

    ``x: [T, d_model] -> [T, d_model]``. Three steps, each with a hand-written backward
    (:mod:`moe_lib.kernels`):

    1. ``xs = x[src]``: the ``n`` kept copies sorted by expert (``[n, d_model]``);
    2. every expert on its contiguous slice (``[n, d_model]``): block by block on a CPU, one
       grouped GEMM per projection on a GPU;
    3. ``y[t] = sum_j w[t, j] * out[pos[t, j]]``: unpermute and combine in one weighted gather.

    The only host synchronisation is reading the slice sizes
    (:func:`moe_lib.permute.sort_by_expert`).
    """
    _check(x, routing, experts)
    perm = Permutation.from_routing(routing)
    out = experts.forward_slices(permute(x, perm), perm.counts)  # [n, d_model]
    # nothing dropped: kept_weights == weights, without the multiply by the mask
    weights = routing.kept_weights if perm.has_dropped else routing.weights  # [T, k]
    return unpermute_combine(out, weights.to(out.dtype), perm).to(x.dtype)


def dispatch_dense(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Every expert on every token, mixed by the gate weights: ``[T, d] -> [T, d]``.

    ``y = sum_e G[:, e] * E_e(x)`` with ``G = routing.gates(kept_only=True): [T, E]``.
    """
    _check(x, routing, experts)
    outs = experts.forward_all(x)  # [E, T, d_model]
    gates = routing.gates(kept_only=True).to(outs.dtype)  # [T, E]
    return torch.einsum("etd,te->td", outs, gates).to(x.dtype)


DISPATCHERS = {"loop": dispatch_loop, "sorted": dispatch_sorted, "dense": dispatch_dense}
DISPATCH_KINDS = tuple(DISPATCHERS)
