"""The routers: modules that map tokens ``x: [T, d_model]`` to a :class:`~moe_lib.routing.Routing`.

- :class:`DenseRouter`: softmax gating over every expert (Jacobs et al. 1991);
- :class:`TopKRouter`: token choice, score -> select -> weight (:mod:`moe_lib.routing`), with
  every option of the routers in use today: softmax or sigmoid scores, group-limited selection,
  a selection-only bias with its auxiliary-loss-free update (DeepSeek-V3), renormalised, raw or
  top-k-softmax weights, a routed scaling factor, a learned logit bias, Switch's input jitter;
- :class:`NoisyTopKRouter`: noisy top-k gating (Shazeer et al. 2017);
- :class:`ExpertChoiceRouter`: each expert takes its top-C tokens (Zhou et al. 2022).

Every router computes in float32 for narrower inputs, also under ``torch.autocast`` (see
:mod:`moe_lib.routing`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int,
    check_int_range,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_real,
    check_tensor,
)
from moe_lib.routing import (
    SCORES,
    WEIGHTINGS,
    Routing,
    _build_routing,
    _score,
    _select,
    _topk_weights,
    _weigh,
    check_group_limits,
    no_autocast,
    router_dtype,
)

ROUTER_KINDS = ("dense", "topk", "noisy_topk", "expert_choice")


class DenseRouter(nn.Module):
    """Softmax gating over all experts (Jacobs et al. 1991): every expert runs on every token.

    y = sum_i softmax(x W_g + b)_i E_i(x). ``expert_ids`` is ``[T, E]`` (all experts, in order).
    ``bias``: a learned bias on the logits (as in Switch Transformers' router and gpt-oss's).
    """

    def __init__(self, d_model: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        check_bool("bias", bias)
        self.d_model = d_model
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=bias)
        if bias:
            nn.init.zeros_(self.gate.bias)

    def check_input(self, x: Tensor) -> None:
        """``x`` must be a float tensor ``[T, d_model]`` on the router's device."""
        check_tensor("x", x, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.gate.weight.device)

    def logits(self, x: Tensor) -> Tensor:
        """Clean router logits ``z = x W_g^T + b: [T, E]`` in float32 (float64 for float64)."""
        self.check_input(x)
        with no_autocast(x.device):
            return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        dtype = router_dtype(x)
        b = None if self.gate.bias is None else self.gate.bias.to(dtype)
        return F.linear(x.to(dtype), self.gate.weight.to(dtype), b)

    def forward(self, x: Tensor) -> Routing:
        """``x: [T, d_model]`` -> :class:`Routing` (see :mod:`moe_lib.routing` for the dtypes)."""
        self.check_input(x)
        with no_autocast(x.device):
            return self.route(x)

    def route(self, x: Tensor) -> Routing:
        """The routing maths, on a checked input, with autocast off."""
        z = self._logits(x)
        ids = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        probs = z.softmax(dim=-1)  # the gate weights are the probabilities
        return _build_routing(ids, probs, z, probs=probs)


class TopKRouter(DenseRouter):
    """Token choice: each token goes to k experts, in three steps (:mod:`moe_lib.routing`).

    Args:
        top_k: experts per token, in [1, E].
        weighting: "renormalize" | "topk_softmax" | "raw" (step 3).
        jitter_eps: in training, multiply the router input by U(1 - eps, 1 + eps) (Switch), [0, 1).
        score: "softmax" | "sigmoid" (step 1).
        n_group, topk_group: group-limited selection (both or neither; step 2).
        selection_bias: hold a per-expert bias ``b`` (a buffer, not trained by gradient) added
            to the scores for choosing only; :meth:`update_selection_bias` moves it.
        routed_scaling_factor: multiplies the gate weights (> 0; 2.5 in DeepSeek-V3).
        bias: a learned bias on the logits.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        weighting: str = "renormalize",
        jitter_eps: float = 0.0,
        score: str = "softmax",
        n_group: int | None = None,
        topk_group: int | None = None,
        selection_bias: bool = False,
        routed_scaling_factor: float = 1.0,
        bias: bool = False,
    ) -> None:
        check_positive_int("num_experts", num_experts)
        check_int_range("top_k", top_k, 1, num_experts)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_real("jitter_eps", jitter_eps, 0.0, 1.0, high_open=True)  # x * U(1 - eps, 1 + eps)
        check_choice("score", score, SCORES)
        if (n_group is None) != (topk_group is None):
            raise ValueError("n_group and topk_group go together: give both or neither, got "
                             f"n_group={n_group!r}, topk_group={topk_group!r}")
        if n_group is not None:
            check_group_limits(num_experts, top_k, n_group, topk_group)
        check_bool("selection_bias", selection_bias)
        check_positive("routed_scaling_factor", routed_scaling_factor)
        super().__init__(d_model, num_experts, bias)
        self.top_k = top_k
        self.weighting = weighting
        self.jitter_eps = float(jitter_eps)
        self.score = score
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.has_selection_bias = selection_bias
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts))
            # chosen assignments per expert since the last update (training forwards only)
            self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.int64),
                                 persistent=False)

    def route(self, x: Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x, dtype=router_dtype(x))
            x = x.to(noise.dtype) * noise.uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        z = self._logits(x)  # [T, E]
        plain = (self.score == "softmax" and not self.has_selection_bias
                 and self.n_group is None and self.routed_scaling_factor == 1.0)
        if plain:  # Switch / Mixtral / Qwen / OLMoE / gpt-oss: select on the logits
            probs = z.softmax(dim=-1)  # once, for the weights and the Routing record
            ids, w = _topk_weights(z, self.top_k, self.weighting, probs)
            return _build_routing(ids, w, z, probs=probs)
        scores, probs = _score(z, self.score)
        choice = scores
        if self.has_selection_bias:
            choice = scores + self.selection_bias.to(scores.dtype)  # for choosing only
        ids = _select(choice.detach(), self.top_k, self.n_group, self.topk_group)
        w = _weigh(ids, scores, z, self.weighting, self.routed_scaling_factor)
        if self.has_selection_bias and self.training and torch.is_grad_enabled():
            self.load_counts += torch.bincount(ids.reshape(-1), minlength=self.num_experts)
        return _build_routing(ids, w, z, probs=probs,
                             scores=None if self.score == "softmax" else scores)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's own signature
        """``.to(dtype)`` and friends move the selection bias but keep it float32 (as DeepSeek
        does): in bfloat16 a step of gamma = 1e-3 on a bias of 0.5 would round away."""
        keep = self.selection_bias if self.has_selection_bias else None
        out = super()._apply(fn, recurse)
        if keep is not None and self.selection_bias.dtype in (torch.bfloat16, torch.float16):
            self.selection_bias = keep.to(device=self.selection_bias.device)
        return out

    @torch.no_grad()
    def update_selection_bias(self, gamma: float) -> Tensor:
        """Auxiliary-loss-free balancing (DeepSeek-V3; Wang et al. 2024): after the optimizer
        step, ``b_i += gamma * sign(mean_j load_j - load_i)``, where ``load_i`` counts the
        assignments chosen for expert i by the training forward passes since the last update
        (all micro-batches of the step; never eval or no-grad passes). The counts restart at
        zero. Returns the change ``[E]`` (zeros when nothing was counted). gamma = 0.001 for
        most of DeepSeek-V3's training, then 0 (frozen).
        """
        if not self.has_selection_bias:
            raise ValueError("update_selection_bias needs a router built with "
                             "selection_bias=True")
        check_nonnegative("gamma", gamma)
        load = self.load_counts.to(self.selection_bias.dtype)
        if load.sum() == 0:
            return torch.zeros_like(self.selection_bias)
        change = float(gamma) * torch.sign(load.mean() - load)
        self.selection_bias += change
        self.load_counts.zero_()
        return change


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017), noise in training only.

    H(x)_i = (x W_g)_i + N(0, 1) * softplus((x W_noise)_i); G(x) = softmax(KeepTopK(H(x), k)).
    ``W_noise`` starts at zero, as in the paper, so the initial noise scale is softplus(0) ~ 0.69;
    ``noise_scale`` multiplies the noise (0 turns it off; 1 is the paper's).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        weighting: str = "topk_softmax",
        noise_scale: float = 1.0,
        bias: bool = False,
    ) -> None:
        check_nonnegative("noise_scale", noise_scale)
        super().__init__(d_model, num_experts, top_k, weighting, bias=bias)
        self.noise = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)
        self.noise_scale = float(noise_scale)

    def route(self, x: Tensor) -> Routing:
        z = self._logits(x)
        probs = z.softmax(dim=-1)  # of the clean logits: for the Routing record
        if not self.training or self.noise_scale == 0:
            ids, w = _topk_weights(z, self.top_k, self.weighting, probs)
            return _build_routing(ids, w, z, probs=probs)
        dtype = router_dtype(x)
        std = F.softplus(F.linear(x.to(dtype), self.noise.weight.to(dtype))) * self.noise_scale
        h = z + torch.randn_like(z) * std  # [T, E]
        ids, w = _topk_weights(h, self.top_k, self.weighting)
        return _build_routing(ids, w, z, noisy_logits=h, noise_std=std, probs=probs)


def expert_choice_capacity(capacity_factor: float, num_tokens: int, num_experts: int) -> int:
    """Tokens each expert takes in expert choice: C = min(T, ceil(c * T / E)) (Zhou et al.
    2022, k = n c / e). With c = k every expert processes the tokens of top-k routing on
    average."""
    check_positive("capacity_factor", capacity_factor)
    check_int("num_tokens", num_tokens, low=0)
    check_positive_int("num_experts", num_experts)
    if capacity_factor >= num_experts:
        return num_tokens
    return min(num_tokens, math.ceil(capacity_factor * num_tokens / num_experts))


class ExpertChoiceRouter(DenseRouter):
    """Expert choice (Zhou et al. 2022): scores S = softmax(x W_g): [T, E]; each expert takes the
    C tokens with its largest scores, C = :func:`expert_choice_capacity`; token t's gate for
    expert e is S[t, e] when e took t.

    Every expert gets exactly C tokens (perfect balance by construction) and a token gets 0 to
    E experts. The choice looks at the whole batch, so it is not causal: a later token can
    change whether an earlier one is taken. The Routing has ``expert_ids = [0..E-1]`` for every
    token and ``selected: [T, E]`` marks the pairs the experts took.
    """

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 2.0,
                 bias: bool = False) -> None:
        check_positive("capacity_factor", capacity_factor)
        super().__init__(d_model, num_experts, bias)
        self.capacity_factor = float(capacity_factor)

    def route(self, x: Tensor) -> Routing:
        z = self._logits(x)
        probs = z.softmax(dim=-1)  # [T, E]
        T, E = probs.shape
        C = expert_choice_capacity(self.capacity_factor, T, E)
        top = probs.detach().topk(C, dim=0).indices  # [C, E]: the tokens each expert takes
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, top, True)  # [T, E]
        ids = torch.arange(E, device=x.device).expand(T, -1)
        return _build_routing(ids, probs, z, probs=probs, selected=selected)
