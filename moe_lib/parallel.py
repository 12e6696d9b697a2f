"""Expert parallelism on ``torch.distributed``: N ranks, E / N experts each, tokens moved by
all-to-all (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; DeepSeek-V3).

Every rank keeps a copy of the router (and of the shared experts) and the experts
``[rank * E/N, (rank + 1) * E/N)``. One forward pass of :class:`ExpertParallelMoE` on a rank's own
tokens ``x: [..., d_model]``:

1. route the rank's tokens locally (the same router everywhere);
2. one ``all_gather`` of a few integers per rank: its token count and its assignments per
   (slot, expert), ``[k, E]``. From them every rank knows the global batch: the global capacity
   C = ceil(cf * T_global * k / E), the place of each of its assignments in the global priority
   queue (first choices before second choices, earlier tokens first, ranks in order, exactly as
   :func:`moe_lib.capacity.apply_capacity` orders the concatenated batch), and the counts the
   balance losses need. This costs N (k E + 6) int64 per rank and layer: 4 MiB for 256 ranks
   with E = 256, k = 8, under 1 % of the token traffic of such a layer; an all-reduce would do
   for dropless routing, but not for the capacity queue, which needs the counts of the ranks
   before this one (an exclusive prefix sum over ranks, which torch.distributed lacks);
3. one ``all_to_all`` of counts: the kept copies this rank sends to each expert, ``[E]`` ->
   the copies it will receive for its experts from each rank, ``[N, E/N]`` (the split sizes);
4. one ``all_to_all_single`` of the token copies, sorted by expert, with those splits
   (dropless: exactly the kept copies travel, no padding);
5. the local experts on contiguous slices (rows regrouped from (source rank, expert) to expert);
6. the results back with the splits swapped, and the weighted combine of
   :func:`moe_lib.permute.unpermute_combine`.

Gradients flow through :func:`all_to_all`, whose backward is the all-to-all with the splits
swapped. Semantics (tested with 2 and 4 gloo ranks): each rank's ``y`` and input gradient equal
what the single-process :class:`~moe_lib.layer.MoE` gives for those tokens when it runs on all
ranks' tokens concatenated (rank 0's first); each rank's expert gradients equal the
single-process ones of those experts; the router's (and shared experts') gradients summed over
the ranks equal the single-process ones. Summing them (a data-parallel all-reduce of the
replicated parameters) is the caller's job. The auxiliary losses are global: counts and
probability sums are summed over the group, so every rank holds the single-process loss, and its
gradient reaches each rank's tokens once (:func:`sum_over_ranks`).

Costs per token and layer (the model of :func:`traffic_model`): k copies of d values go out and
come back, of which a fraction (N - 1) / N under uniform routing leaves the rank:
``2 k d bytes_per_value (N - 1) / N`` bytes. The slowest rank sets the step time, so routing
imbalance costs directly. :func:`spawn` starts N local processes with a process group (gloo on
CPUs, NCCL on GPUs) for tests, benchmarks and examples; ``torchrun`` does the same for scripts.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moe_lib import losses
from moe_lib.capacity import apply_capacity, expert_capacity
from moe_lib.checks import (
    check_choice,
    check_int,
    check_positive,
    check_positive_int,
    check_real,
    check_tensor,
    check_type,
)
from moe_lib.experts import ExpertBank, compute_dtype
from moe_lib.layer import MoE, MoEOutput, _layer_output, _route_tokens
from moe_lib.permute import Permutation, permute, unpermute_combine
from moe_lib.routers import expert_choice_capacity
from moe_lib.routing import Routing

BACKENDS = ("gloo", "nccl")
START_METHODS = ("spawn", "fork")
# dtype codes exchanged so that ranks can check they agree before any token moves
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATS = 6  # int64 fields before the slot counts: T, dims>=3, dtype, compute dtype, grad, groups


# --------------------------------------------------------------------------------------------
# Collectives with gradients


def _check_group(group: object) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or start the ranks "
                         "with moe_lib.parallel.spawn or torchrun)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the world), "
                        f"got {type(group).__name__}")


def _check_splits(name: str, splits: object, world: int) -> list[int]:
    if not isinstance(splits, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in splits
    ):
        raise TypeError(f"{name} must be a list of {world} ints >= 0, got {splits!r:.80}")
    if len(splits) != world or min(splits, default=0) < 0:
        raise ValueError(f"{name} must be a list of {world} ints >= 0 (one per rank), got "
                         f"{list(splits)!r:.80}")
    return list(splits)


class _AllToAll(torch.autograd.Function):
    """``torch.distributed.all_to_all_single`` along dim 0 with its backward: the same exchange
    with the splits swapped. (torch 2.13 deprecates the autograd version in
    ``torch.distributed.nn.functional`` in favour of a private module, so moe_lib keeps this
    ten-line Function around the public collective.)"""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        g = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(g, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return g, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None) -> Tensor:
    """Exchange rows between the ranks of ``group``: ``x: [sum(in_splits), ...]`` ->
    ``[sum(out_splits), ...]``.

    Rank r sends rows ``x[sum(in_splits[:s]) : sum(in_splits[:s + 1])]`` to rank s and receives
    ``out_splits[s]`` rows from rank s, placed in rank order. ``out_splits`` of rank r must equal
    the ``in_splits[r]`` of every sender (exchange counts first). Differentiable: the backward is
    the same exchange with the splits swapped (every rank must run it, so every rank's loss must
    depend on the result).
    """
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the rows to exchange)")
    _check_group(group)
    world = dist.get_world_size(group)
    out_splits = _check_splits("out_splits", out_splits, world)
    in_splits = _check_splits("in_splits", in_splits, world)
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"in_splits must sum to x.shape[0]={x.shape[0]}, got {sum(in_splits)}")
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of ``t`` over the ranks (all-reduce). Backward: the identity.

    The result is a global quantity that every rank holds and that the global loss counts once
    (not once per rank), so the gradient of that loss with respect to this rank's ``t`` is the
    gradient with respect to the sum: the identity. An all-reduce in the backward (the autograd
    all-reduce of ``torch.distributed.nn``) would count the loss N times.
    """

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sum_over_ranks(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``sum_r t_r`` over the ranks of ``group``, with the gradient of a global quantity: each
    rank's ``t`` receives the gradient of the sum unchanged (see :class:`_SumOverRanks`).

    Use it for totals from which every rank computes the same loss (probability sums, counts):
    with the loss on every rank, rank r's parameters get the gradient of its own tokens, and the
    sum of the ranks' gradients is the gradient of the loss.
    """
    check_tensor("t", t, kind=("float", "int"))
    _check_group(group)
    return _SumOverRanks.apply(t, group)


# --------------------------------------------------------------------------------------------
# Global capacity from per-rank counts


def slot_counts(routing: Routing) -> Tensor:
    """``[k, E]`` int64: the assignments the router chose per slot (first choice, second ...)
    and expert; what a rank tells the others so that each can place its assignments in the
    global capacity queues (:func:`kept_across_ranks`)."""
    check_type("routing", routing, Routing)
    k, E = routing.top_k, routing.num_experts
    counts = torch.zeros(k, E, dtype=torch.int64, device=routing.expert_ids.device)
    return counts.scatter_add_(1, routing.expert_ids.t(), routing.chosen.t().long())


def kept_across_ranks(routing: Routing, all_slot_counts: Tensor, rank: int,
                      capacity: int) -> Tensor:
    """``kept: [T, k]`` of rank ``rank``'s assignments when every expert has ``capacity`` slots
    over the tokens of all ranks, served in the single-process priority order.

    The global queue of expert e is: slot 0 of rank 0's tokens, slot 0 of rank 1's, ..., then
    slot 1 of rank 0's, and so on; within a (slot, rank) in token order. With
    ``n[s, j, e] = all_slot_counts`` (every rank's :func:`slot_counts`, ``[N, k, E]``), rank r's
    slot-j assignments to e start at

        start[j, e] = sum_{j' < j} sum_s n[s, j', e] + sum_{s < r} n[s, j, e],

    and the i-th of them (token order) is kept when ``start[j, e] + i < capacity``. The result
    equals :func:`moe_lib.capacity.apply_capacity` on the concatenated batch (tested).
    """
    check_type("routing", routing, Routing)
    k, E = routing.top_k, routing.num_experts
    check_tensor("all_slot_counts", all_slot_counts, dims=3, kind="int", shape=(None, k, E),
                 device=routing.expert_ids.device)
    check_int("rank", rank, low=0, high=all_slot_counts.shape[0] - 1)
    check_int("capacity", capacity, low=0)
    n = all_slot_counts.long()
    per_slot = n.sum(0)  # [k, E]
    start = (per_slot.cumsum(0) - per_slot) + n[:rank].sum(0)  # [k, E]
    T = routing.num_tokens
    device = routing.expert_ids.device
    chosen = routing.chosen  # [T, k]
    queue = torch.arange(k, device=device) * E + routing.expert_ids  # [T, k]: (slot, expert)
    queue = torch.where(chosen, queue, k * E).reshape(-1)  # token-major: token order per queue
    order = torch.argsort(queue, stable=True)
    sizes = torch.bincount(queue, minlength=k * E + 1)
    first = torch.cumsum(sizes, 0) - sizes
    place = torch.empty_like(queue)
    place[order] = torch.arange(queue.numel(), device=device) - first[queue[order]]
    start_flat = torch.cat([start.reshape(-1), start.new_zeros(1)])
    kept = (start_flat[queue] + place < capacity).view(T, k)
    return kept & chosen


# --------------------------------------------------------------------------------------------
# The layer


@dataclass
class Traffic:
    """The token rows one forward pass on this rank exchanged (read from the split sizes).

    ``send_rows[s]``: token copies this rank sent to rank s in the dispatch (``s == rank``: the
    copies for its own experts, which never leave the process); ``recv_rows[s]``: copies it
    received from rank s, which it sends back after its experts ran. ``dispatch_row_bytes`` and
    ``combine_row_bytes``: bytes of one row each way (d_model times the element size of the
    tokens, and of the experts' output). ``count_bytes``: the int64 counts exchanged (the
    all-gather of slot counts and the all-to-all of expert counts), bytes received by this rank.
    """

    rank: int
    send_rows: list[int]
    recv_rows: list[int]
    dispatch_row_bytes: int
    combine_row_bytes: int
    count_bytes: int

    @property
    def rows_sent(self) -> int:
        """Copies sent to other ranks, dispatch and combine together."""
        r = self.rank
        return sum(self.send_rows) - self.send_rows[r] + sum(self.recv_rows) - self.recv_rows[r]

    @property
    def bytes_sent(self) -> int:
        """Bytes of token rows this rank sent to other ranks (dispatch + combine)."""
        r = self.rank
        return ((sum(self.send_rows) - self.send_rows[r]) * self.dispatch_row_bytes
                + (sum(self.recv_rows) - self.recv_rows[r]) * self.combine_row_bytes)

    @property
    def bytes_received(self) -> int:
        """Bytes of token rows this rank received from other ranks (dispatch + combine)."""
        r = self.rank
        return ((sum(self.recv_rows) - self.recv_rows[r]) * self.dispatch_row_bytes
                + (sum(self.send_rows) - self.send_rows[r]) * self.combine_row_bytes)


def traffic_model(tokens: int, top_k: int, d_model: int, bytes_per_value: int,
                  world_size: int) -> float:
    """Bytes a rank sends per MoE layer under uniform routing: ``2 T k d b (N - 1) / N``.

    Each of its ``T`` tokens goes out as ``k`` copies of ``d`` values of ``b`` bytes (dispatch)
    and comes back (combine); under uniform routing a copy's expert lives on another rank with
    probability (N - 1) / N.
    """
    check_int("tokens", tokens, low=0)
    check_positive_int("top_k", top_k)
    check_positive_int("d_model", d_model)
    check_positive_int("bytes_per_value", bytes_per_value)
    check_positive_int("world_size", world_size)
    return 2.0 * tokens * top_k * d_model * bytes_per_value * (world_size - 1) / world_size


class ExpertParallelMoE(nn.Module):
    """An :class:`~moe_lib.layer.MoE` spread over the ranks of a process group (see the module
    docstring for the algorithm and its semantics). Build it with :func:`expert_parallel`.

    Holds the layer's router and shared experts (the same modules, replicated on every rank) and
    a new :class:`~moe_lib.experts.ExpertBank` with this rank's E / N experts, copied from the
    layer (the full layer can be dropped afterwards). ``last_traffic`` is the
    :class:`Traffic` of the latest forward pass.

    Every rank must call ``forward`` the same number of times, with inputs of the same number of
    dimensions and dtype and the same grad mode (checked with the first collective: every rank
    raises the same error), and, in training, backpropagate through ``y`` (the backward runs two
    all-to-alls on every rank). Local experts always run on contiguous slices, whatever the
    layer's ``dispatch``. Noisy routers and jitter draw their noise on each rank from its own
    generator, so they match a single process in eval mode only.
    """

    def __init__(self, layer: MoE, group: dist.ProcessGroup | None = None) -> None:
        check_type("layer", layer, MoE)
        _check_group(group)
        super().__init__()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        E = layer.num_experts
        if E % world:
            raise ValueError(f"num_experts={E} must be divisible by the number of ranks "
                             f"{world} (each rank holds E / N experts)")
        c = layer.config
        self.config = c
        self.group = group
        self.rank, self.world_size = rank, world
        self.num_local_experts = E // world
        self.first_expert = rank * self.num_local_experts
        self.router = layer.router
        self.shared = layer.shared
        bank = layer.experts
        with torch.random.fork_rng(devices=[]):  # the weights are copied: leave the RNG as is
            self.experts = ExpertBank(self.num_local_experts, c.d_model, c.d_hidden,
                                      c.activation(), bias=c.expert_bias)
        self.experts.to(bank.w_in.device, bank.w_in.dtype)
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        with torch.no_grad():
            for name in ("w_in", "w_out", "b_in", "b_out"):
                src = getattr(bank, name)
                if src is not None:
                    getattr(self.experts, name).copy_(src[local])
        self.last_traffic: Traffic | None = None

    @property
    def local_experts(self) -> range:
        """The global ids of the experts this rank holds."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, experts="
                f"[{self.first_expert}, {self.first_expert + self.num_local_experts})")

    @torch.no_grad()
    def update_selection_bias(self, gamma: float) -> Tensor:
        """DeepSeek-V3's bias update with the load counted over all ranks: the router's counts
        are summed over the group first, so every rank makes the single-process update."""
        router = self.router
        if not getattr(router, "has_selection_bias", False):
            raise ValueError("update_selection_bias needs a layer built with "
                             "selection_bias=True")
        check_real("gamma", gamma, low=0.0)
        dist.all_reduce(router.load_counts, group=self.group)
        return router.update_selection_bias(gamma)

    def _gather_stats(self, x: Tensor, routing: Routing) -> Tensor:
        """All ranks' ``[_STATS + k E]`` int64 summaries, ``[N, ...]``; checks that they agree
        on what decides the collectives and the buffers."""
        T = routing.num_tokens
        present = int((routing.group_sizes() > 0).sum()) if T else 0
        head = [T, int(x.dim() >= 3), _dtype_code(x.dtype), _dtype_code(compute_dtype(x)),
                int(torch.is_grad_enabled()), present]
        mine = torch.cat([torch.tensor(head, device=x.device),
                          slot_counts(routing).reshape(-1)])
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        stats = torch.stack(parts)
        agree = stats[:, 1:5]
        if not bool((agree == agree[:1]).all()):
            raise ValueError(
                "the ranks must call forward with the same number of input dimensions (2-D or "
                "sequences), the same dtype and autocast dtype, and the same grad mode; got "
                f"[dims>=3, dtype, compute dtype, grad] per rank: {agree.tolist()}")
        return stats

    def _global_routing(self, routing: Routing, stats: Tensor) -> Routing:
        """The routing with the kept mask of the single-process layer on the whole batch."""
        c = self.config
        T_all = stats[:, 0].tolist()
        T_global = sum(T_all)
        if c.router == "expert_choice":
            return self._expert_choice(routing, T_all)
        if c.capacity_factor is None and c.capacity is None:
            return routing
        if c.capacity_per == "sequence" and routing.groups is not None:
            # capacity per sequence: sequences never span ranks, so it is local
            return apply_capacity(routing, c.capacity_factor, capacity=c.capacity,
                                  per_group=True)
        k, E = routing.top_k, routing.num_experts
        C = c.capacity if c.capacity is not None else expert_capacity(
            c.capacity_factor, T_global, k, E)
        counts = stats[:, _STATS:].view(self.world_size, k, E)
        return routing.with_kept(kept_across_ranks(routing, counts, self.rank, C))

    def _expert_choice(self, routing: Routing, T_all: list[int]) -> Routing:
        """Expert choice over the global batch: every rank gathers all probabilities ``[T_global,
        E]`` (T_global E values per rank: selection looks at the whole batch) and takes its rows
        of the global top-C selection."""
        probs = routing.probs.detach()
        T_max = max(T_all)
        padded = probs.new_zeros(T_max, probs.shape[1])
        padded[: probs.shape[0]] = probs
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        everything = torch.cat([p[:n] for p, n in zip(parts, T_all)])  # [T_global, E]
        C = expert_choice_capacity(self.config.capacity_factor, everything.shape[0],
                                   routing.num_experts)
        top = everything.topk(C, dim=0).indices  # [C, E]
        selected = torch.zeros_like(everything, dtype=torch.bool).scatter_(0, top, True)
        start = sum(T_all[: self.rank])
        mine = selected[start : start + routing.num_tokens]
        return replace(routing, selected=mine).with_kept(mine)

    def _exchange(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Steps 3-6 of the module docstring: ``tokens: [T, d]`` -> combined ``y: [T, d]``."""
        N, E_loc = self.world_size, self.num_local_experts
        perm = Permutation.from_routing(routing)
        send_counts = torch.tensor(perm.counts, dtype=torch.int64, device=tokens.device)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [N * E_loc]
        recv_counts = recv_counts.view(N, E_loc)  # [source rank, local expert]
        send_rows = send_counts.view(N, E_loc).sum(1).tolist()
        recv_rows = recv_counts.sum(1).tolist()
        xs = permute(tokens, perm)  # [n, d]: kept copies sorted by expert, so by rank
        if torch.is_grad_enabled() and not xs.requires_grad:
            # every rank runs the backward all-to-alls, also one whose own input needs no grad
            xs = xs.detach().requires_grad_()
        received = all_to_all(xs, recv_rows, send_rows, self.group)  # [m, d] (source, expert)
        expert_of_row = torch.arange(E_loc, device=tokens.device).repeat(N)
        expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # [m]
        by_expert = torch.argsort(expert_of_row, stable=True)  # (source, expert) -> expert
        back_order = torch.empty_like(by_expert)
        back_order[by_expert] = torch.arange(by_expert.numel(), device=tokens.device)
        out = self.experts.forward_slices(received.index_select(0, by_expert),
                                          recv_counts.sum(0).tolist())  # [m, d]
        out = all_to_all(out.index_select(0, back_order), send_rows, recv_rows, self.group)
        self.last_traffic = Traffic(
            rank=self.rank, send_rows=send_rows, recv_rows=recv_rows,
            dispatch_row_bytes=xs.shape[1] * xs.element_size(),
            combine_row_bytes=out.shape[1] * out.element_size(),
            count_bytes=8 * (N * (_STATS + routing.top_k * routing.num_experts) + N * E_loc))
        weights = routing.kept_weights if perm.has_dropped else routing.weights  # [T, k]
        return unpermute_combine(out, weights.to(out.dtype), perm).to(tokens.dtype)

    def _losses(self, routing: Routing, stats: Tensor) -> dict[str, Tensor]:
        """The layer's configured losses over the global batch (one all-reduce of the sums)."""
        c = self.config
        T_global = int(stats[:, 0].sum())
        if T_global == 0:
            return {}
        k, E = routing.top_k, routing.num_experts
        counts = stats[:, _STATS:].view(self.world_size, k, E).sum((0, 1))  # chosen, [E]
        probs = routing.probs
        dtype = probs.dtype
        counts = counts.to(device=probs.device, dtype=dtype)
        grouped = bool(stats[0, 1]) and c.balance_loss in ("switch_per_sequence",
                                                             "sequence_wise")
        groups_global = int(stats[:, 5].sum())
        parts: dict[str, Tensor] = {}
        if c.balance_loss in ("switch", "switch_per_sequence", "sequence_wise") and not grouped:
            parts["probs"] = probs.sum(0)  # [E]
        if grouped:  # per-sequence losses: the sum of this rank's sequences' losses
            fn = (losses.sequence_balance_loss if c.balance_loss == "sequence_wise"
                  else lambda r: losses.switch_loss(r, per_group=True))
            present = int(stats[self.rank, 5])
            local = fn(routing) * present if present else probs.new_zeros(())
            parts["groups"] = local.reshape(1)
        if c.balance_loss == "importance":
            parts["importance"] = losses.importance(routing)
            parts["load"] = losses.smooth_load(routing)  # float32 counts without noise
        if c.z_loss_coef > 0:
            parts["z"] = torch.logsumexp(routing.logits, dim=-1).pow(2).sum().reshape(1)
        if not parts:
            return {}
        sizes = [p.numel() for p in parts.values()]
        total = sum_over_ranks(torch.cat([p.to(dtype) for p in parts.values()]), self.group)
        # each sum back in its own dtype, as the single-process loss computes it
        summed = {name: t.to(parts[name].dtype) for name, t in zip(parts, total.split(sizes))}
        out: dict[str, Tensor] = {}
        if c.balance_loss in ("switch", "switch_per_sequence"):
            out["switch"] = (summed["groups"][0] / groups_global if grouped else
                             E * torch.sum((counts / T_global) * (summed["probs"] / T_global)))
        elif c.balance_loss == "sequence_wise":
            out["sequence_wise"] = (summed["groups"][0] / groups_global if grouped else torch.sum(
                E / (k * T_global) * counts * (summed["probs"] / T_global)))
        elif c.balance_loss == "importance":
            out["importance"] = losses.cv_squared(summed["importance"])
            out["load"] = losses.cv_squared(summed["load"])
        if c.z_loss_coef > 0:
            out["z"] = summed["z"][0] / T_global
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MoEOutput:
        """This rank's tokens ``x: [..., d_model]`` -> :class:`~moe_lib.layer.MoEOutput` for
        them (``y: [..., d_model]``; ``routing``: this rank's tokens, with the kept mask of the
        global capacity; ``aux_loss`` and ``losses``: the global values, the same on every
        rank). ``mask`` as in :meth:`moe_lib.layer.MoE.forward`."""
        c = self.config
        tokens, rows, routing = _route_tokens(self.router, x, mask, c.d_model)
        stats = self._gather_stats(x, routing)
        routing = self._global_routing(routing, stats)
        y = self._exchange(tokens, routing)
        if self.shared is not None:
            y = y + self.shared(tokens).to(y.dtype)
        return _layer_output(x, y, rows, routing, self._losses(routing, stats), c)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def expert_parallel(layer: MoE, group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
    """Spread ``layer``'s experts over the ranks of ``group`` (None: the world).

    Call it on every rank with the same layer (same seed or same weights); each rank keeps E / N
    experts (E must be divisible by N) and the replicated router. See
    :class:`ExpertParallelMoE`.
    """
    return ExpertParallelMoE(layer, group)


# --------------------------------------------------------------------------------------------
# Starting ranks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, backend: str, folder: str,
               args: tuple, threads: int, timeout: float) -> None:
    """One spawned rank: join the process group, run ``fn``, save its result, leave."""
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, args: tuple = (), *, backend: str = "gloo",
          timeout: float = 120.0, threads: int = 1, start_method: str = "spawn") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes that form a process
    group, and return their results, ``[result of rank 0, ...]``.

    ``fn`` returns something ``torch.save`` can store. ``start_method``: "spawn" (fresh
    interpreters: ``fn`` must be importable by name, a module-level function; safe everywhere,
    required with CUDA) or "fork" (Linux/macOS CPU only: the ranks inherit this process's
    imported modules, so they start in a fraction of a second instead of importing torch
    again). ``backend``: "gloo" (CPU) or "nccl" (one GPU per rank). ``timeout`` (seconds)
    bounds the whole run and each collective; ``threads``: torch's intra-op threads per rank.
    If a rank raises, the others are stopped and the error (with the rank's traceback) is
    raised here; after ``timeout`` every rank is killed and a TimeoutError raised.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, (rank, world_size, *args) -> result, got "
                        f"{type(fn).__name__}")
    check_positive_int("world_size", world_size)
    check_type("args", args, tuple)
    check_choice("backend", backend, BACKENDS)
    check_positive("timeout", timeout)
    check_positive_int("threads", threads)
    check_choice("start_method", start_method, START_METHODS)
    if backend == "nccl" and start_method != "spawn":
        raise ValueError("backend='nccl' needs start_method='spawn' (CUDA cannot be used in "
                         f"forked processes), got start_method={start_method!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank: world_size={world_size}, "
                         f"{torch.cuda.device_count()} GPUs visible")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="moe_lib_spawn_") as folder:
        context = mp.start_processes(
            _rank_main, args=(fn, world_size, free_port(), backend, folder, args, threads,
                              float(timeout)),
            nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {world_size} ranks did not finish within "
                                       f"timeout={timeout} s; they were killed")
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
