"""The slow reference implementations, written as blog posts and model code write them.

They are slow on purpose: the dispatch benchmark (:mod:`moe_lib.bench.dispatch`) measures the
fast path against them. Each takes the router and expert weights of an existing top-k
:class:`~moe_lib.layer.MoE` (router "topk", renormalised weights, no capacity), so that their
outputs can be checked against it:

- :class:`MaskLoopMoE`, the tutorial form: per expert, a boolean mask of its tokens, then
  ``y[mask] += w * E(x[mask])``;
- :class:`IndexAddMoE`, the form of Hugging Face's ``MixtralSparseMoeBlock``: one-hot expert
  mask, ``torch.where``, ``index_add_``;
- :class:`ModuleLoopMoE`, the layout of older transformers releases and of most tutorials: a
  ``ModuleList`` of separate expert modules, each three ``nn.Linear`` (:class:`LinearSwiGLU`,
  Mixtral's ``w2(silu(w1 x) * w3 x)``), run in a plain loop with ``index_add_``;
- :class:`GroupedMMBank`, an expert bank whose slices always run through ``torch._grouped_mm``
  (on a CPU too, where the library does not choose it).

With ``p = softmax(x W_g): [T, E]`` and ``(w, e) = topk(p, k)``, each computes
``y_t = sum_j (w_tj / sum_i w_ti) * E_{e_tj}(x_t)``: ``x: [T, d] -> y: [T, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lib.activations import activation
from moe_lib.checks import check_tensor, check_type
from moe_lib.experts import ExpertBank, FeedForward
from moe_lib.layer import MoE


def expert_list(bank: ExpertBank) -> nn.ModuleList:
    """One ``FeedForward`` per expert with the bank's weights (separate parameters, as in HF)."""
    check_type("bank", bank, ExpertBank)
    experts = nn.ModuleList()
    bias = bank.b_in is not None
    for e in range(bank.num_experts):
        ffn = FeedForward(bank.d_model, bank.d_hidden, bank.activation, bias=bias)
        ffn.w_in.data.copy_(bank.w_in.data[e])
        ffn.w_out.data.copy_(bank.w_out.data[e])
        if bias:
            ffn.b_in.data.copy_(bank.b_in.data[e])
            ffn.b_out.data.copy_(bank.b_out.data[e])
        experts.append(ffn)
    return experts


class LinearSwiGLU(nn.Module):
    """A SwiGLU FFN as three ``nn.Linear`` without biases (Mixtral's ``MixtralBlockSparseTop2MLP``
    in older transformers releases): ``w2(silu(w1(x)) * w3(x))``, ``x: [n, d] -> [n, d]``,
    weights in ``nn.Linear``'s ``[out, in]`` layout. ``from_swiglu(w_in, w_out)`` takes a
    FeedForward's or an expert's weights (``w_in = [gate | up]: [d, 2h]``, ``w_out: [h, d]``)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)  # up
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)  # down

    @classmethod
    def from_swiglu(cls, w_in: Tensor, w_out: Tensor) -> LinearSwiGLU:
        """The same FFN as ``silu(x @ w_in[:, :h]) * (x @ w_in[:, h:]) @ w_out``."""
        check_tensor("w_out", w_out, dims=2, kind="float")
        h, d = w_out.shape
        check_tensor("w_in", w_in, dims=2, kind="float", shape=(d, 2 * h))
        ffn = cls(d, h)
        with torch.no_grad():
            ffn.w1.weight.copy_(w_in[:, :h].t())
            ffn.w3.weight.copy_(w_in[:, h:].t())
            ffn.w2.weight.copy_(w_out.t())
        return ffn

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _check_topk_layer(moe: object) -> MoE:
    check_type("moe", moe, MoE)
    c = moe.config
    plain = (c.router == "topk" and c.weighting == "renormalize" and c.score == "softmax"
             and c.capacity_factor is None and c.capacity is None and c.n_shared == 0
             and c.n_group is None and not c.selection_bias and c.routed_scaling_factor == 1.0
             and not c.router_bias)
    if not plain:
        raise ValueError("moe must be a plain top-k layer (router='topk', softmax scores, "
                         "renormalised weights, no capacity, no shared experts, no groups, no "
                         "selection or router bias, scale 1): the form these baselines compute; "
                         f"got {c}")
    return moe


class _Baseline(nn.Module):
    """The shared parts: the layer's router weights (shared) and a copy of its experts."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        moe = _check_topk_layer(moe)
        self.gate = moe.router.gate  # shared router weights
        self.experts = expert_list(moe.experts)
        self.k = moe.top_k
        self.num_experts = moe.num_experts
        self.d_model = moe.d_model

    def _check_input(self, x: Tensor) -> None:
        check_tensor("x", x, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.gate.weight.device)


class MaskLoopMoE(_Baseline):
    """The tutorial form: per expert, a mask of its tokens, then ``y[mask] += w * E(x[mask])``."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        probs = self.gate(x).softmax(dim=-1)  # [T, E]
        weights, ids = probs.topk(self.k, dim=-1)  # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = ids == e  # [T, k]
            mask = chosen.any(dim=-1)  # [T] tokens that picked expert e
            if not mask.any():
                continue
            w = (weights * chosen).sum(dim=-1, keepdim=True)  # [T, 1] their weight for e
            y[mask] += w[mask] * expert(x[mask])
        return y


class IndexAddMoE(_Baseline):
    """The Hugging Face Mixtral form: one-hot expert mask, ``torch.where``, ``index_add_``."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        router_logits = self.gate(x)  # [T, E]
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.k, dim=-1)  # [T, k]
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)  # [E,k,T]
        for e in range(self.num_experts):
            slot, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            out = self.experts[e](x[token]) * routing_weights[token, slot, None]
            final.index_add_(0, token, out.to(x.dtype))
        return final


class ModuleLoopMoE(_Baseline):
    """Separate per-expert modules (three ``nn.Linear`` each) in a plain loop with ``index_add_``:
    the layout of older transformers releases (``MixtralSparseMoeBlock`` with
    ``MixtralBlockSparseTop2MLP`` experts) and of most tutorials."""

    def __init__(self, moe: MoE) -> None:
        super().__init__(moe)
        if moe.config.expert != "swiglu" or moe.config.expert_bias:
            raise ValueError(f"moe must have SwiGLU experts without biases, got "
                             f"expert={moe.config.expert!r}, expert_bias={moe.config.expert_bias}")
        bank = moe.experts
        self.experts = nn.ModuleList(LinearSwiGLU.from_swiglu(bank.w_in.data[e], bank.w_out.data[e])
                                     for e in range(bank.num_experts))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        probs = self.gate(x).softmax(dim=-1)  # [T, E]
        weights, selected = probs.topk(self.k, dim=-1)  # [T, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        final = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(selected == e)  # [n_e] each
            if token.numel() == 0:
                continue
            final.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return final


class GroupedMMBank(ExpertBank):
    """An expert bank whose slices always run through ``torch._grouped_mm`` (any device):
    ``h = x_sorted @ w_in[e]`` and ``act(h) @ w_out[e]`` on expert e's rows, one kernel each."""

    def forward_slices(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """``x_sorted: [n, d_model]``, rows grouped by expert (``counts[e]`` rows for expert e)
        -> ``[n, d_model]`` in the same order."""
        check_tensor("x_sorted", x_sorted, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.w_in.device)
        if not isinstance(counts, list) or len(counts) != self.num_experts:
            raise ValueError(f"counts must be a list of {self.num_experts} row counts, got "
                             f"{counts!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"counts must hold ints >= 0, got {counts}")
        if sum(counts) != x_sorted.shape[0]:
            raise ValueError(f"counts must sum to the {x_sorted.shape[0]} rows of x_sorted, got "
                             f"{sum(counts)}")
        if self.b_in is not None:
            raise ValueError("GroupedMMBank has no bias path: build it with bias=False")
        offs = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_sorted, self.w_in.to(x_sorted.dtype), offs=offs)
        act = activation(h, self.activation)
        return torch._grouped_mm(act, self.w_out.to(x_sorted.dtype), offs=offs)
