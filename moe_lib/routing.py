"""Routers and the ``Routing`` record they return.

Every router maps tokens ``x: [tokens, d_model]`` to a :class:`Routing`. What is float32:
the router's logits, softmax, noise, top-k and gate weights are computed in float32 for float32,
bfloat16 and float16 inputs (as in Switch and Mixtral; a bf16 router can flip choices between
near-tied experts), also inside ``torch.autocast``, which is switched off for the router; in
float64 for float64 inputs (exact gradient checks). Capacity is applied afterwards by
:func:`moe_lib.capacity.apply_capacity`; a router alone keeps every assignment.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int_range,
    check_nonnegative,
    check_positive_int,
    check_real,
    check_tensor,
)

WEIGHTINGS = ("renormalize", "topk_softmax", "raw")


@dataclass
class Routing:
    """Which experts each token goes to, with what weight; read by dispatch, losses and plots.

    Shapes (``T`` tokens, ``E`` experts, ``k`` assignments per token):

    - ``expert_ids: [T, k]`` int64, slot 0 is each token's first choice.
    - ``weights: [T, k]`` float32 (float64 for float64 input) gate weights as the router
      computed them (before capacity).
    - ``probs: [T, E]`` float32 softmax of the clean router logits.
    - ``logits: [T, E]`` float32 clean router logits (no noise).
    - ``kept: [T, k]`` bool, False where capacity dropped the assignment.
    - ``tokens_per_expert: [E]`` int64, assignments kept per expert.
    - ``noisy_logits`` / ``noise_std: [T, E]``: noisy top-k only, in training (else None).
    """

    expert_ids: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor
    kept: Tensor
    tokens_per_expert: Tensor
    noisy_logits: Tensor | None = None
    noise_std: Tensor | None = None

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
    def dropped(self) -> int:
        """Assignments dropped by capacity (0 when dropless)."""
        return int((~self.kept).sum())

    @property
    def kept_weights(self) -> Tensor:
        """``[T, k]`` gate weights with dropped assignments zeroed: what the combine uses."""
        return self.weights * self.kept

    def gates(self, kept_only: bool = False) -> Tensor:
        """Dense gate matrix ``G: [T, E]``: the router's weight of each expert for each token.

        ``kept_only=True`` zeroes the assignments that capacity dropped.
        """
        check_bool("kept_only", kept_only)
        w = self.kept_weights if kept_only else self.weights
        g = w.new_zeros(self.num_tokens, self.num_experts)
        return g.scatter_add(1, self.expert_ids, w)

    def chosen_counts(self) -> Tensor:
        """``[E]`` assignments the router chose per expert, before capacity."""
        return torch.bincount(self.expert_ids.reshape(-1), minlength=self.num_experts)

    def with_kept(self, kept: Tensor) -> Routing:
        """A copy with a new ``kept: [T, k]`` bool mask and ``tokens_per_expert`` recounted."""
        check_tensor("kept", kept, kind="bool", shape=tuple(self.expert_ids.shape),
                     device=self.expert_ids.device)
        ids = self.expert_ids[kept]
        counts = torch.bincount(ids, minlength=self.num_experts)
        return replace(self, kept=kept, tokens_per_expert=counts)


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


def make_routing(
    expert_ids: Tensor,
    weights: Tensor,
    logits: Tensor,
    noisy_logits: Tensor | None = None,
    noise_std: Tensor | None = None,
    probs: Tensor | None = None,
) -> Routing:
    """Build a Routing with every assignment kept (no capacity yet), after checking its parts.

    ``expert_ids: [T, k]`` integers in ``[0, E)``, ``weights: [T, k]``, ``logits: [T, E]`` floats;
    ``probs``: ``softmax(logits)`` when the caller has it already (else computed here).
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
    for name, t in (("probs", probs), ("noisy_logits", noisy_logits), ("noise_std", noise_std)):
        if t is not None:
            check_tensor(name, t, kind="float", shape=(T, E), device=logits.device)
    return _routing(expert_ids.long(), weights, logits, noisy_logits, noise_std, probs)


def _routing(
    expert_ids: Tensor,
    weights: Tensor,
    logits: Tensor,
    noisy_logits: Tensor | None = None,
    noise_std: Tensor | None = None,
    probs: Tensor | None = None,
) -> Routing:
    """:func:`make_routing` without the checks, for the routers (whose ids are in range by
    construction; the range check would make the device wait for the host)."""
    kept = torch.ones_like(expert_ids, dtype=torch.bool)
    counts = torch.bincount(expert_ids.reshape(-1), minlength=logits.shape[-1])
    return Routing(
        expert_ids=expert_ids,
        weights=weights,
        probs=logits.softmax(dim=-1) if probs is None else probs,
        logits=logits,
        kept=kept,
        tokens_per_expert=counts,
        noisy_logits=noisy_logits,
        noise_std=noise_std,
    )


def topk_weights(
    scores: Tensor, k: int, weighting: str, probs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pick the k best experts from ``scores: [T, E]`` logits and weight them.

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
    scores: Tensor, k: int, weighting: str, probs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`topk_weights` without the checks (the routers' own arguments are checked once)."""
    top_logits, ids = scores.topk(k, dim=-1)  # [T, k]
    if weighting == "topk_softmax":
        return ids, top_logits.softmax(dim=-1)
    if probs is None:
        probs = scores.softmax(dim=-1)
    top = probs.gather(1, ids)  # [T, k]
    if weighting == "raw":
        return ids, top
    return ids, top / top.sum(dim=-1, keepdim=True)


class DenseRouter(nn.Module):
    """Softmax gating over all experts (Jacobs et al. 1991): every expert runs on every token.

    y = sum_i softmax(x W_g)_i E_i(x). ``expert_ids`` is ``[T, E]`` (all experts, in order).
    """

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        self.d_model = d_model
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def check_input(self, x: Tensor) -> None:
        """``x`` must be a float tensor ``[T, d_model]`` on the router's device."""
        check_tensor("x", x, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.gate.weight.device)

    def logits(self, x: Tensor) -> Tensor:
        """Clean router logits ``z = x W_g^T: [T, E]`` in float32 (float64 for float64 input)."""
        self.check_input(x)
        with no_autocast(x.device):
            return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        dtype = router_dtype(x)
        return F.linear(x.to(dtype), self.gate.weight.to(dtype))

    def forward(self, x: Tensor) -> Routing:
        """``x: [T, d_model]`` -> :class:`Routing` (see the module docstring for the dtypes)."""
        self.check_input(x)
        with no_autocast(x.device):
            return self.route(x)

    def route(self, x: Tensor) -> Routing:
        """The routing maths, on a checked input, with autocast off."""
        z = self._logits(x)
        ids = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        probs = z.softmax(dim=-1)  # the gate weights are the probabilities
        return _routing(ids, probs, z, probs=probs)


class TopKRouter(DenseRouter):
    """Top-k gating: each token goes to the k experts with the largest logits.

    ``weighting`` makes the normalisation explicit (see :func:`topk_weights`). ``jitter_eps > 0``
    multiplies the router input by U(1 - eps, 1 + eps) in training (Switch Transformer jitter).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        weighting: str = "renormalize",
        jitter_eps: float = 0.0,
    ) -> None:
        check_positive_int("num_experts", num_experts)
        check_int_range("top_k", top_k, 1, num_experts)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_real("jitter_eps", jitter_eps, 0.0, 1.0, high_open=True)  # x * U(1 - eps, 1 + eps)
        super().__init__(d_model, num_experts)
        self.top_k = top_k
        self.weighting = weighting
        self.jitter_eps = float(jitter_eps)

    def route(self, x: Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x, dtype=router_dtype(x))
            x = x.to(noise.dtype) * noise.uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        z = self._logits(x)
        probs = z.softmax(dim=-1)  # once, for the weights and the Routing record
        ids, w = _topk_weights(z, self.top_k, self.weighting, probs)
        return _routing(ids, w, z, probs=probs)


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
    ) -> None:
        check_nonnegative("noise_scale", noise_scale)
        super().__init__(d_model, num_experts, top_k, weighting)
        self.noise = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)
        self.noise_scale = float(noise_scale)

    def route(self, x: Tensor) -> Routing:
        z = self._logits(x)
        probs = z.softmax(dim=-1)  # of the clean logits: for the Routing record
        if not self.training or self.noise_scale == 0:
            ids, w = _topk_weights(z, self.top_k, self.weighting, probs)
            return _routing(ids, w, z, probs=probs)
        dtype = router_dtype(x)
        std = F.softplus(F.linear(x.to(dtype), self.noise.weight.to(dtype))) * self.noise_scale
        h = z + torch.randn_like(z) * std  # [T, E]
        ids, w = _topk_weights(h, self.top_k, self.weighting)
        return _routing(ids, w, z, noisy_logits=h, noise_std=std, probs=probs)


ROUTER_KINDS = ("dense", "topk", "noisy_topk")
