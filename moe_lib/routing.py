"""The ``Routing`` record, and routing's three steps: score -> select -> weight.

A router (:mod:`moe_lib.routers`) maps tokens ``x: [T, d_model]`` to logits ``z = x W^T (+ b):
[T, E]`` and then takes three named, documented steps:

1. **score** (:func:`score_experts`): ``"softmax"`` (Switch, Mixtral, Qwen, OLMoE, gpt-oss)
   s = softmax(z) over the E experts; ``"sigmoid"`` (DeepSeek-V3) s_i = sigmoid(z_i), each
   expert's affinity on its own.
2. **select** (:func:`select_experts`): each token's top-k experts by ``s + b_sel``, where
   ``b_sel`` is an optional per-expert selection bias (DeepSeek-V3's auxiliary-loss-free
   balancing) that changes which experts are chosen and never the gate values; optionally
   group-limited (DeepSeek-V3): the E experts form ``n_group`` groups, a group's score is the
   sum of its two best (biased) scores, only the ``topk_group`` best groups stay, and the
   experts of the other groups are masked with -inf (a 0 fill would let an expert with a
   negative biased score lose to a masked one).
3. **weight** (:func:`weigh_experts`): ``"renormalize"`` (Mixtral, Qwen3, DeepSeek-V3) the chosen
   s divided by their sum; ``"raw"`` (Switch; Qwen1.5/2-MoE and OLMoE with norm_topk_prob=False)
   the chosen s as they are; ``"topk_softmax"`` (Shazeer 2017, gpt-oss) softmax over the chosen
   logits; then times ``routed_scaling_factor`` (2.5 in DeepSeek-V3).

What is float32: logits, scores, selection and gate weights are computed in float32 for float32,
bfloat16 and float16 inputs (as in Switch and Mixtral; a bf16 router can flip choices between
near-tied experts), also inside ``torch.autocast``, which the routers switch off; in float64 for
float64 inputs (exact gradient checks). Capacity is applied afterwards by
:func:`moe_lib.capacity.apply_capacity`; a router alone keeps every assignment it selects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int,
    check_int_range,
    check_positive,
    check_tensor,
)

SCORES = ("softmax", "sigmoid")
WEIGHTINGS = ("renormalize", "topk_softmax", "raw")


@dataclass
class Routing:
    """Which experts each token goes to, with what weight; read by dispatch, losses and plots.

    Shapes (``T`` tokens, ``E`` experts, ``k`` assignment slots per token):

    - ``expert_ids: [T, k]`` int64, slot 0 is each token's first choice.
    - ``weights: [T, k]`` gate weights as the router computed them (before capacity), float32
      (float64 for float64 input), ``routed_scaling_factor`` included.
    - ``probs: [T, E]`` the router probabilities that balance losses average (P_i): softmax of
      the clean logits, or for a sigmoid router its scores normalised to sum to 1 per token.
    - ``logits: [T, E]`` the clean router logits (no noise; a learned router bias included).
    - ``kept: [T, k]`` bool, False where the assignment does not run (dropped by capacity, or
      not selected).
    - ``tokens_per_expert: [E]`` int64, assignments kept per expert.
    - ``noisy_logits`` / ``noise_std: [T, E]``: noisy top-k only, in training (else None).
    - ``scores: [T, E]`` the affinities the gate weights come from (a sigmoid router's
      sigmoid(z)); None when they are ``probs``.
    - ``selected: [T, k]`` bool, the slots the router chose: all of them for token choice
      (None), for expert choice the (token, expert) pairs an expert picked.
    - ``groups: [T]`` int64 group (sequence) of each token, in ``[0, num_groups)``; None when
      all tokens form one group. Capacity and sequence-wise losses can work per group.
    """

    expert_ids: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor
    kept: Tensor
    tokens_per_expert: Tensor
    noisy_logits: Tensor | None = None
    noise_std: Tensor | None = None
    scores: Tensor | None = None
    selected: Tensor | None = None
    groups: Tensor | None = None
    num_groups: int = 1

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def affinities(self) -> Tensor:
        """``[T, E]`` the scores gate weights come from: ``scores``, else ``probs``."""
        return self.probs if self.scores is None else self.scores

    @property
    def chosen(self) -> Tensor:
        """``[T, k]`` bool: the slots the router selected (all of them for token choice)."""
        if self.selected is None:
            return torch.ones_like(self.kept)
        return self.selected

    @property
    def dropped(self) -> int:
        """Selected assignments that capacity dropped (0 when dropless)."""
        if self.selected is None:
            return int((~self.kept).sum())
        return int((self.selected & ~self.kept).sum())

    @property
    def kept_weights(self) -> Tensor:
        """``[T, k]`` gate weights with dropped assignments zeroed: what the combine uses."""
        return self.weights * self.kept

    def gates(self, kept_only: bool = False) -> Tensor:
        """Dense gate matrix ``G: [T, E]``: the router's weight of each expert for each token.

        ``kept_only=True`` zeroes the assignments that capacity dropped.
        """
        check_bool("kept_only", kept_only)
        if kept_only:
            w = self.kept_weights
        else:
            w = self.weights if self.selected is None else self.weights * self.selected
        g = w.new_zeros(self.num_tokens, self.num_experts)
        return g.scatter_add(1, self.expert_ids, w)

    def chosen_counts(self) -> Tensor:
        """``[E]`` assignments the router chose per expert, before capacity."""
        ids = self.expert_ids if self.selected is None else self.expert_ids[self.selected]
        return torch.bincount(ids.reshape(-1), minlength=self.num_experts)

    def with_kept(self, kept: Tensor) -> Routing:
        """A copy with a new ``kept: [T, k]`` bool mask and ``tokens_per_expert`` recounted."""
        check_tensor("kept", kept, kind="bool", shape=tuple(self.expert_ids.shape),
                     device=self.expert_ids.device)
        if self.selected is not None:
            kept = kept & self.selected  # an assignment never selected never runs
        ids = self.expert_ids[kept]
        counts = torch.bincount(ids, minlength=self.num_experts)
        return replace(self, kept=kept, tokens_per_expert=counts)

    def group_sizes(self) -> Tensor:
        """``[num_groups]`` tokens in each group."""
        if self.groups is None:
            return torch.tensor([self.num_tokens], device=self.expert_ids.device)
        return torch.bincount(self.groups, minlength=self.num_groups)


def router_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 input, float64 for float64: never narrower than float32."""
    check_tensor("x", x, kind="float")
    return torch.promote_types(x.dtype, torch.float32)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch ``torch.autocast`` off on ``device`` inside the block (the router's maths must not
    drop to bfloat16/float16); a no-op for device types autocast does not know."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# The three steps


def score_experts(logits: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """Step 1: ``logits: [T, E] -> (scores, probs)``, both ``[T, E]``.

    - ``"softmax"``: s = softmax(z); probs = s.
    - ``"sigmoid"``: s_i = sigmoid(z_i) (DeepSeek-V3); probs = s / sum_j s_j, the normalised
      affinities DeepSeek-V3's sequence-wise balance loss averages (s' in its paper).
    """
    check_tensor("logits", logits, dims=2, kind="float")
    check_choice("score", score, SCORES)
    return _score(logits, score)


def _score(logits: Tensor, score: str) -> tuple[Tensor, Tensor]:
    if score == "softmax":
        probs = logits.softmax(dim=-1)
        return probs, probs
    s = logits.sigmoid()
    return s, s / s.sum(dim=-1, keepdim=True)


def select_experts(
    choice: Tensor, k: int, n_group: int | None = None, topk_group: int | None = None
) -> Tensor:
    """Step 2: each token's top-k experts by ``choice: [T, E]`` -> ``expert_ids: [T, k]`` int64.

    ``choice`` is what selection ranks: the logits (softmax routers: the same order as their
    probabilities), or the scores plus a selection bias. Group-limited (``n_group`` groups of
    E / n_group experts, keep ``topk_group`` of them): a group's score is the sum of its two
    best choice values (its one value for groups of one expert); experts outside the kept
    groups get -inf, so they can never be chosen, whatever their bias.
    """
    check_tensor("choice", choice, dims=2, kind="float")
    E = choice.shape[1]
    check_int_range("k", k, 1, max(1, E))
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group go together: give both or neither, got "
                         f"n_group={n_group!r}, topk_group={topk_group!r}")
    if n_group is not None:
        check_group_limits(E, k, n_group, topk_group)
    return _select(choice, k, n_group, topk_group)


def check_group_limits(num_experts: int, k: int, n_group: int, topk_group: int) -> None:
    """``n_group`` divides E, ``topk_group`` in [1, n_group], and the kept groups hold at least
    k experts."""
    check_int("n_group", n_group, low=1, high=num_experts)
    if num_experts % n_group:
        raise ValueError(f"n_group must divide num_experts={num_experts}, got {n_group}")
    check_int("topk_group", topk_group, low=1, high=n_group)
    if topk_group * (num_experts // n_group) < k:
        raise ValueError(f"topk_group={topk_group} groups of {num_experts // n_group} experts "
                         f"hold fewer than top_k={k} experts; raise topk_group")


def _select(choice: Tensor, k: int, n_group: int | None, topk_group: int | None) -> Tensor:
    if n_group is None or n_group == 1:
        return choice.topk(k, dim=-1).indices
    T, E = choice.shape
    per_group = E // n_group
    grouped = choice.view(T, n_group, per_group)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, G]
    keep = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(T, E)
    return masked.topk(k, dim=-1).indices


def weigh_experts(
    expert_ids: Tensor, scores: Tensor, logits: Tensor, weighting: str,
    routed_scaling_factor: float = 1.0,
) -> Tensor:
    """Step 3: gate weights ``[T, k]`` of the chosen ``expert_ids: [T, k]``.

    With ``s = scores.gather(ids)``: ``"renormalize"`` g = s / sum(s); ``"raw"`` g = s;
    ``"topk_softmax"`` g = softmax(logits.gather(ids)). Then g times ``routed_scaling_factor``.
    For a softmax router "renormalize" and "topk_softmax" give the same weights.
    """
    check_tensor("logits", logits, dims=2, kind="float")
    check_tensor("scores", scores, kind="float", shape=tuple(logits.shape), device=logits.device)
    check_tensor("expert_ids", expert_ids, dims=2, kind="int", shape=(logits.shape[0], None),
                 device=logits.device)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_positive("routed_scaling_factor", routed_scaling_factor)
    return _weigh(expert_ids.long(), scores, logits, weighting, float(routed_scaling_factor))


def _weigh(ids: Tensor, scores: Tensor, logits: Tensor, weighting: str, scale: float) -> Tensor:
    if weighting == "topk_softmax":
        w = logits.gather(1, ids).softmax(dim=-1)
    else:
        w = scores.gather(1, ids)  # [T, k]
        if weighting == "renormalize":
            w = w / w.sum(dim=-1, keepdim=True)
    return w if scale == 1.0 else w * scale


def topk_weights(
    scores: Tensor, k: int, weighting: str, probs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Select and weigh for a softmax router in one call: the k best of ``scores: [T, E]``
    (logits) and their gate weights (see :func:`weigh_experts`).

    - ``"renormalize"`` (Mixtral): p = softmax(z) over all E, keep the top-k p, divide by their sum.
    - ``"topk_softmax"`` (Shazeer 2017): G = softmax(KeepTopK(z, k)), other logits set to -inf.
      Mathematically the same weights as "renormalize".
    - ``"raw"`` (Switch, un-normalised Qwen-MoE): keep the top-k softmax probabilities as they are;
      they sum to less than 1.

    ``probs``: ``softmax(scores)`` when the caller has it already (else computed here).
    Returns ``(expert_ids: [T, k] int64, weights: [T, k])`` in the dtype of ``scores``.
    """
    check_tensor("scores", scores, dims=2, kind="float")
    check_int_range("k", k, 1, max(1, scores.shape[1]))
    check_choice("weighting", weighting, WEIGHTINGS)
    if probs is not None:
        check_tensor("probs", probs, kind="float", shape=tuple(scores.shape),
                     device=scores.device)
    return _topk_weights(scores, k, weighting, probs)


def _topk_weights(
    logits: Tensor, k: int, weighting: str, probs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`topk_weights` without the checks (the routers' own arguments are checked once)."""
    ids = logits.topk(k, dim=-1).indices  # [T, k]
    if probs is None and weighting != "topk_softmax":
        probs = logits.softmax(dim=-1)
    return ids, _weigh(ids, probs if probs is not None else logits, logits, weighting, 1.0)


# --------------------------------------------------------------------------------------------
# Building records


def make_routing(
    expert_ids: Tensor,
    weights: Tensor,
    logits: Tensor,
    noisy_logits: Tensor | None = None,
    noise_std: Tensor | None = None,
    probs: Tensor | None = None,
    scores: Tensor | None = None,
) -> Routing:
    """Build a Routing with every assignment kept (no capacity yet), after checking its parts.

    ``expert_ids: [T, k]`` integers in ``[0, E)``, ``weights: [T, k]``, ``logits: [T, E]`` floats;
    ``probs``: ``softmax(logits)`` when the caller has it already (else computed here);
    ``scores``: a sigmoid router's affinities (else None).
    """
    check_tensor("logits", logits, dims=2, kind="float")
    T, E = logits.shape
    check_tensor("expert_ids", expert_ids, dims=2, kind="int", shape=(T, None),
                 device=logits.device)
    check_tensor("weights", weights, kind="float", shape=tuple(expert_ids.shape),
                 device=logits.device)
    if expert_ids.numel():
        low, high = int(expert_ids.min()), int(expert_ids.max())
        if low < 0 or high >= E:
            raise ValueError(f"expert_ids must be in [0, {E - 1}] (E={E} columns of logits), "
                             f"got values in [{low}, {high}]")
    named = (("probs", probs), ("noisy_logits", noisy_logits), ("noise_std", noise_std),
             ("scores", scores))
    for name, t in named:
        if t is not None:
            check_tensor(name, t, kind="float", shape=(T, E), device=logits.device)
    return _build_routing(expert_ids.long(), weights, logits, noisy_logits, noise_std, probs,
                         scores)


def _build_routing(
    expert_ids: Tensor,
    weights: Tensor,
    logits: Tensor,
    noisy_logits: Tensor | None = None,
    noise_std: Tensor | None = None,
    probs: Tensor | None = None,
    scores: Tensor | None = None,
    selected: Tensor | None = None,
) -> Routing:
    """:func:`make_routing` without the checks, for the routers (whose parts are right by
    construction; the range check would make the device wait for the host). ``selected``:
    expert choice's ``[T, k]`` mask of the pairs the experts picked."""
    kept = torch.ones_like(expert_ids, dtype=torch.bool) if selected is None else selected
    ids = expert_ids if selected is None else expert_ids[selected]
    counts = torch.bincount(ids.reshape(-1), minlength=logits.shape[-1])
    return Routing(
        expert_ids=expert_ids,
        weights=weights,
        probs=logits.softmax(dim=-1) if probs is None else probs,
        logits=logits,
        kept=kept,
        tokens_per_expert=counts,
        noisy_logits=noisy_logits,
        noise_std=noise_std,
        scores=scores,
        selected=selected,
    )


def with_groups(routing: Routing, groups: Tensor | None, num_groups: int) -> Routing:
    """The routing with each token's group (sequence): ``groups: [T]`` int64 in
    ``[0, num_groups)``, or None for one group."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    check_int("num_groups", num_groups, low=1)
    if groups is not None:
        check_tensor("groups", groups, dims=1, kind="int", shape=(routing.num_tokens,),
                     device=routing.expert_ids.device)
    return replace(routing, groups=groups, num_groups=num_groups)


def concat_routings(routings: list[Routing]) -> Routing:
    """One record for the tokens of several (micro-batches, ranks): every ``[T, ...]`` field
    concatenated along the tokens, counts summed, groups renumbered one after the other."""
    if isinstance(routings, Routing) or not isinstance(routings, (list, tuple)):
        raise TypeError(f"routings must be a list of Routing records, got "
                        f"{type(routings).__name__}")
    if not routings:
        raise ValueError("routings must hold at least one Routing record")
    for i, r in enumerate(routings):
        if not isinstance(r, Routing):
            raise TypeError(f"routings[{i}] must be a Routing, got {type(r).__name__}")
    first = routings[0]
    if any(r.num_experts != first.num_experts or r.top_k != first.top_k for r in routings):
        raise ValueError("routings must share the number of experts and of slots per token")
    if len(routings) == 1:
        return first

    def cat(name: str) -> Tensor | None:
        parts = [getattr(r, name) for r in routings]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ValueError(f"routings must all have {name} or all lack it")
        return torch.cat(parts)

    groups = None
    if any(r.groups is not None for r in routings):
        offsets, parts = 0, []
        for r in routings:
            g = r.groups if r.groups is not None else torch.zeros(
                r.num_tokens, dtype=torch.long, device=r.expert_ids.device)
            parts.append(g + offsets)
            offsets += r.num_groups
        groups = torch.cat(parts)
    num_groups = sum(r.num_groups for r in routings) if groups is not None else 1
    return Routing(
        expert_ids=cat("expert_ids"), weights=cat("weights"), probs=cat("probs"),
        logits=cat("logits"), kept=cat("kept"),
        tokens_per_expert=sum(r.tokens_per_expert for r in routings),
        noisy_logits=cat("noisy_logits"), noise_std=cat("noise_std"), scores=cat("scores"),
        selected=cat("selected"), groups=groups, num_groups=num_groups,
    )
