"""Auxiliary losses computed from a Routing record (they never re-run the router).

All return float32 scalars (float64 for a float64 router) and are unweighted; the layer
multiplies them by its coefficients. Each docstring gives the value under perfectly uniform
routing (every expert gets the same share of tokens and of router probability).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lib.checks import check_tensor, check_type
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


def switch_loss(routing: Routing) -> Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    f_i = (assignments the router chose for expert i, before capacity) / tokens, so sum_i f_i = k
    (each slot is normalised on its own, as in the Hugging Face Mixtral loss); P_i = mean router
    probability of expert i. Under perfectly uniform routing the loss is k (1 for Switch, k = 1).
    0 for a batch without tokens.
    """
    check_type("routing", routing, Routing)
    T = routing.num_tokens
    if T == 0:
        return routing.probs.new_zeros(())
    f = routing.chosen_counts().to(routing.probs.dtype) / T  # [E]
    p = routing.probs.mean(dim=0)  # [E]
    return routing.num_experts * torch.sum(f * p)


def z_loss(routing: Routing) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of (logsumexp_j z_j)^2.

    It depends on the logits' scale, not on balance: (ln E)^2 when every logit is 0; 0 for a
    batch without tokens.
    """
    check_type("routing", routing, Routing)
    if routing.num_tokens == 0:
        return routing.logits.new_zeros(())
    return torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
