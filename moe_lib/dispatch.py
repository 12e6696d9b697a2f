"""Moving token copies to their experts and the results back ("dispatch" and "combine").

Four implementations with the same result (up to float rounding), chosen by ``MoE(dispatch=)``:

- :func:`dispatch_loop` ("loop"): the reference, one expert at a time; easy to follow line by
  line, and differentiable any number of times;
- :func:`dispatch_sorted` ("sorted"): sort the ``T * k`` token copies by expert once, run each
  expert on a contiguous slice, and put the results back with the inverse permutation; its
  gradients are gathers too (:mod:`moe_lib.permute`), never scatters;
- :func:`dispatch_dense` ("dense"): every expert on every token, mixed by the dense gate matrix
  (E / k times the expert FLOPs; the natural form of dense gating, ``router="dense"``);
- :func:`dispatch_direct` ("direct"): the inference path for small batches: no sort and no
  permutation; each expert chosen by some token runs directly on the rows of the tokens that
  chose it, and one weighted gather combines them.

Each reads a :class:`~moe_lib.routing.Routing` and returns ``y: [T, d_model]`` with
y_t = sum_j w_tj * kept_tj * E_{e_tj}(x_t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lib.checks import check_tensor, check_type
from moe_lib.experts import ExpertBank
from moe_lib.kernels import gather_sum
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


DIRECT_MAX_COPIES_PER_EXPERT = 1
""":func:`dispatch_direct` runs each expert directly while the batch has at most this many token
copies per expert on average (``T k <= E``), and the sorted path above. Measured with
``python -m moe_lib.bench.decode`` on one CPU thread (three runs, on an AMD EPYC and an Intel
Xeon): at batch 1 the direct loop took 4-17% less time than the sorted path; at 2 tokens the
two took turns (from 9% slower to 15% faster); at one copy per expert (8 tokens, E = 32, k = 4)
the loop was about 6% slower in all three runs, so a lower limit may pay; from about two rows
per expert on (8 tokens with E = 8, k = 2) one sort and one permutation cost no more than a
gather and a scatter per expert."""


def direct_plan(routing: Routing) -> tuple[dict[int, list[int]], bool]:
    """The kept copies of each expert, read from the routing in one host transfer.

    Returns ``(copies, dropped)``: ``copies[e]`` lists the flat copy indices ``c = t * k + j``
    of the kept assignments to expert e in token order (the order the stable sort of
    :func:`moe_lib.permute.sort_by_expert` gives them), for the experts that got any, in
    increasing expert order; ``dropped`` is True when capacity dropped some copy.
    """
    check_type("routing", routing, Routing)
    flat = torch.where(routing.kept, routing.expert_ids, -1).reshape(-1).tolist()  # [T*k]
    copies: dict[int, list[int]] = {}
    for c, e in enumerate(flat):
        if e >= 0:
            copies.setdefault(e, []).append(c)
    return dict(sorted(copies.items())), len(flat) > sum(len(v) for v in copies.values())


def dispatch_direct(x: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Small-batch (decode) dispatch: every chosen expert straight on its tokens' rows, no sort.

    ``x: [T, d_model] -> [T, d_model]``, ``y_t = sum_j w_tj kept_tj E_{e_tj}(x_t)``, in three
    steps:

    1. read the ``[T, k]`` expert ids to the host once and list each expert's copies
       (:func:`direct_plan`); no device sort, no inverse permutation, no permuted copy of ``x``;
    2. for each expert e that some token chose, in increasing order: ``out[c] = E_e(x[t])`` for
       its copies ``c = t k + j`` (:meth:`moe_lib.experts.ExpertBank.forward_copies`: each
       expert once, on the rows of all its tokens; no gather when its tokens are all T tokens
       in order, no scatter when each expert has one copy, as at batch 1);
    3. ``y[t] = sum_j w[t, j] * out[t k + j]``: one weighted gather-and-sum (``embedding_bag``),
       as the sorted path's combine (dropped copies read a zero row).

    Batches of more than ``DIRECT_MAX_COPIES_PER_EXPERT * E`` copies go to
    :func:`dispatch_sorted` (the same outputs). Each expert's weights are read once per call,
    whatever the number of its tokens: the bytes a decode step must read. On a CPU each expert
    runs on the same rows, in the same order and with the same kernels as one block of the sorted
    path (:func:`moe_lib.kernels.expert_mlp`), and the combine adds the k products in the same
    order: the outputs equal :func:`dispatch_sorted`'s to float rounding, and bit for bit in the
    tests while every expert's rows fit in one block of that kernel and rows are whole multiples
    of 64 bytes (a BLAS may round differently on buffers aligned differently). Differentiable by
    autograd (its backward is autograd's, with scatters: train with "sorted").
    """
    _check(x, routing, experts)
    T, k = routing.expert_ids.shape
    if T == 0:
        return x * 0  # empty, but still part of the graph so that backward works
    if T * k > DIRECT_MAX_COPIES_PER_EXPERT * routing.num_experts:
        return dispatch_sorted(x, routing, experts)  # a batch, not a decode step
    copies, dropped = direct_plan(routing)
    out = experts.forward_copies(x, copies, k)  # [T k (+1), d_model]: row c holds copy c
    n = T * k
    pos = torch.arange(n, device=x.device).view(T, k)
    weights = routing.weights
    if dropped:
        pos = pos.masked_fill(~routing.kept, n)  # dropped copies read the zero row
        weights = routing.kept_weights
    return gather_sum(out, pos, weights.to(out.dtype)).to(x.dtype)


DISPATCHERS = {"loop": dispatch_loop, "sorted": dispatch_sorted, "dense": dispatch_dense,
               "direct": dispatch_direct}
DISPATCH_KINDS = tuple(DISPATCHERS)
