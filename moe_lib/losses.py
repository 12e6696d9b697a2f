"""Auxiliary losses computed from a Routing record (they never re-run the router).

All return float32 scalars (float64 for a float64 router) and are unweighted; the layer
multiplies them by its coefficients. Each docstring gives the value under perfectly uniform
routing (every expert gets the same share of tokens and of router probability).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lib.checks import check_bool, check_int, check_tensor, check_type
from moe_lib.routing import Routing

_EPS = 1e-10


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation, var(v) / mean(v)^2 (population variance).

    Shazeer et al. use CV^2 rather than CV: its gradient is finite (zero) at perfect balance,
    where the gradient of CV = std / mean is not defined. ``v: [n]``; 0 when all are equal.
    """
    check_tensor("v", v, dims=1, kind=("float", "int"))
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + _EPS)


def importance(routing: Routing) -> Tensor:
    """Importance(X)_i = sum over tokens of the gate G(x)_i: ``[E]``."""
    check_type("routing", routing, Routing)
    return routing.gates().sum(dim=0)


def importance_loss(routing: Routing) -> Tensor:
    """L_importance = CV(Importance(X))^2 (Shazeer et al. 2017, eq. 6-7); 0 when uniform."""
    return cv_squared(importance(routing))


def smooth_load(routing: Routing) -> Tensor:
    """Load(X)_i = sum_x P(x, i): the expected number of tokens sent to expert i ``[E]``.

    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / softplus((x W_noise)_i)): the
    probability that expert i would still be in the top k if only its own noise were drawn
    again (Shazeer et al. 2017, appendix A). It is differentiable in W_g and W_noise, unlike the
    count of tokens. Without noise (eval mode, or a router without noise, or k = E) it falls back
    to that count, which carries no gradient.
    """
    check_type("routing", routing, Routing)
    k, E = routing.top_k, routing.num_experts
    if routing.noisy_logits is None or k >= E:
        return routing.chosen_counts().float()
    h, z, std = routing.noisy_logits, routing.logits, routing.noise_std
    top = h.topk(k + 1, dim=-1).values  # [T, k+1]
    threshold_if_in = top[:, k : k + 1]  # (k+1)-th largest: what i must beat if it is in
    threshold_if_out = top[:, k - 1 : k]  # k-th largest: what i must beat if it is out
    is_in = h > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    p_in = normal.cdf((z - threshold_if_in) / std)
    p_out = normal.cdf((z - threshold_if_out) / std)
    return torch.where(is_in, p_in, p_out).sum(dim=0)


def load_loss(routing: Routing) -> Tensor:
    """L_load = CV(Load(X))^2 with the smooth load estimator (Shazeer et al. 2017, appendix A);
    0 when uniform."""
    return cv_squared(smooth_load(routing))


def switch_loss(
    routing: Routing,
    per_group: bool = False,
    global_counts: Tensor | None = None,
    global_tokens: int | None = None,
) -> Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    f_i = (assignments the router chose for expert i, before capacity) / tokens, so sum_i f_i = k
    (each slot is normalised on its own, as in the Hugging Face Mixtral loss); P_i = mean router
    probability of expert i (``routing.probs``). Under perfectly uniform routing the loss is k
    (1 for Switch, k = 1). 0 for a batch without tokens.

    - ``per_group``: f and P per group (sequence) of ``routing.groups``, the loss averaged over
      the groups (Hugging Face's Switch Transformers computes it per sequence).
    - ``global_counts: [E]`` and ``global_tokens``: f from counts pooled over a global batch
      (all micro-batches of a step, all data-parallel ranks) while P stays this batch's own:
      the global-batch balance loss of Qwen (Qiu et al. 2025). f carries no gradient anyway, so
      the pooled counts only change which experts the loss pushes away from.
    """
    check_type("routing", routing, Routing)
    check_bool("per_group", per_group)
    if (global_counts is None) != (global_tokens is None):
        raise ValueError("global_counts and global_tokens go together: give both or neither")
    if global_counts is not None:
        check_tensor("global_counts", global_counts, dims=1, kind=("int", "float"),
                     shape=(routing.num_experts,))
        check_int("global_tokens", global_tokens, low=1)
        if per_group:
            raise ValueError("per_group and global_counts exclude each other")
    T = routing.num_tokens
    if T == 0:
        return routing.probs.new_zeros(())
    dtype = routing.probs.dtype
    if per_group and routing.groups is not None:
        G, E = routing.num_groups, routing.num_experts
        counts = _group_counts(routing).to(dtype)  # [G, E]
        sizes = routing.group_sizes().to(dtype)  # [G]
        p = routing.probs.new_zeros(G, E).index_add(0, routing.groups, routing.probs)
        present = sizes > 0
        f = counts[present] / sizes[present, None]
        p = p[present] / sizes[present, None]
        return E * (f * p).sum(dim=-1).mean()
    if global_counts is None:
        f = routing.chosen_counts().to(dtype) / T  # [E]
    else:
        f = global_counts.to(device=routing.probs.device, dtype=dtype) / global_tokens
    p = routing.probs.mean(dim=0)  # [E]
    return routing.num_experts * torch.sum(f * p)


def _group_counts(routing: Routing) -> Tensor:
    """``[G, E]`` assignments each group chose per expert (before capacity)."""
    G, E = routing.num_groups, routing.num_experts
    flat = (routing.groups[:, None] * E + routing.expert_ids).reshape(-1)
    flat = flat[routing.chosen.reshape(-1)]
    return torch.bincount(flat, minlength=G * E).view(G, E)


def pooled_switch_loss(routings: list[Routing]) -> Tensor:
    """The Switch loss with f and P pooled over several routings before the product, as Hugging
    Face's ``load_balancing_loss_func`` pools the layers of a model (and as a global batch pools
    micro-batches): E * sum_i f_i P_i with f_i = (sum over routings of the chosen counts) /
    (sum of their tokens) and P_i the mean probability over all their tokens. k when uniform.

    The per-layer alternative is ``sum(switch_loss(r) for r in routings)`` (k per layer when
    uniform). They differ when layers are unbalanced in opposite directions: pooling lets one
    layer's surplus on an expert cancel another's deficit.
    """
    if isinstance(routings, Routing) or not isinstance(routings, (list, tuple)):
        raise TypeError(f"routings must be a list of Routing records, got "
                        f"{type(routings).__name__}")
    if not routings:
        raise ValueError("routings must hold at least one Routing record")
    for i, r in enumerate(routings):
        check_type(f"routings[{i}]", r, Routing)
    E = routings[0].num_experts
    if any(r.num_experts != E for r in routings):
        raise ValueError("every routing must have the same number of experts")
    tokens = sum(r.num_tokens for r in routings)
    if tokens == 0:
        return routings[0].probs.new_zeros(())
    dtype = routings[0].probs.dtype
    counts = sum(r.chosen_counts().to(dtype) for r in routings)
    prob_sum = sum(r.probs.sum(dim=0).to(dtype) for r in routings)
    return E * torch.sum((counts / tokens) * (prob_sum / tokens))


def sequence_balance_loss(routing: Routing) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (its eq. 17-20), before the coefficient alpha:

    within each sequence (group) of T tokens, f_i = E / (k T) * #{t : expert i is among t's
    top-k} and P_i = (1/T) sum_t s'_{i,t}, with s' the affinities normalised over all experts
    (``routing.probs``); L = sum_i f_i P_i, averaged over the sequences. 1 under perfectly
    uniform routing (f_i = 1, P_i = 1/E). DeepSeek-V3 weights it by alpha = 1e-4.
    """
    check_type("routing", routing, Routing)
    T, E, k = routing.num_tokens, routing.num_experts, routing.top_k
    if T == 0:
        return routing.probs.new_zeros(())
    dtype = routing.probs.dtype
    if routing.groups is None:
        f = E / (k * T) * routing.chosen_counts().to(dtype)
        return torch.sum(f * routing.probs.mean(dim=0))
    G = routing.num_groups
    sizes = routing.group_sizes().to(dtype)
    present = sizes > 0
    counts = _group_counts(routing).to(dtype)[present]  # [G', E]
    p = routing.probs.new_zeros(G, E).index_add(0, routing.groups, routing.probs)[present]
    n = sizes[present, None]
    f = E / (k * n) * counts
    return (f * (p / n)).sum(dim=-1).mean()


def z_loss(routing: Routing) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of (logsumexp_j z_j)^2.

    It depends on the logits' scale, not on balance: (ln E)^2 when every logit is 0; 0 for a
    batch without tokens.
    """
    check_type("routing", routing, Routing)
    if routing.num_tokens == 0:
        return routing.logits.new_zeros(())
    return torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
