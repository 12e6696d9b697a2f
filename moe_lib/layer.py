"""The MoE layer: router -> capacity -> dispatch to experts -> combine, plus auxiliary losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_lib import losses
from moe_lib.capacity import apply_capacity
from moe_lib.checks import (
    check_choice,
    check_int_range,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from moe_lib.dispatch import DISPATCH_KINDS, DISPATCHERS, dispatch_dense
from moe_lib.experts import EXPERT_KINDS, ExpertBank
from moe_lib.routing import (
    ROUTER_KINDS,
    WEIGHTINGS,
    DenseRouter,
    NoisyTopKRouter,
    Routing,
    TopKRouter,
)

BALANCE_LOSSES = (None, "switch", "importance")
DEFAULT_BALANCE_COEF = {"switch": 1e-2, "importance": 1e-1}


@dataclass
class MoEOutput:
    """What an MoE layer returns.

    ``y: [..., d_model]`` in the input's dtype; ``aux_loss``: float32 scalar, the configured losses
    weighted by their coefficients (zero if none); ``routing``: the :class:`Routing` record
    (over the flattened ``[tokens, ...]``); ``losses``: each configured loss, unweighted.
    """

    y: Tensor
    aux_loss: Tensor
    routing: Routing
    losses: dict[str, Tensor] = field(default_factory=dict)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Args:
        d_model: token width. d_hidden: hidden width of each expert.
        num_experts: E. top_k: experts per token, in [1, E] (ignored by ``router="dense"``).
        expert: "relu" | "gelu" | "swiglu".
        router: "dense" (every expert runs) | "topk" | "noisy_topk".
        capacity_factor: None for dropless, or a float > 0: C = ceil(cf * tokens * k / E).
        balance_loss: None | "switch" | "importance" (Shazeer's importance + smooth load losses).
        balance_coef: weight of the balance loss; None picks 1e-2 for "switch", 1e-1 for
            "importance".
        z_loss_coef: weight of the ST-MoE router z-loss (1e-3 in the paper), >= 0.
        dispatch: "loop" (reference) | "sorted" (fast); identical results.
        weighting: how top-k weights are normalised (see :func:`moe_lib.routing.topk_weights`);
            None: "raw" when top_k == 1 (Switch: a renormalised single weight is always 1, so
            the task loss would give the router no gradient), else "renormalize" for "topk"
            and "topk_softmax" for "noisy_topk".
        jitter_eps: Switch router jitter (``router="topk"`` only), >= 0.
        noise_scale: multiplies the learned noise of ``router="noisy_topk"``, >= 0.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int = 2,
        expert: str = "swiglu",
        router: str = "topk",
        capacity_factor: float | None = None,
        balance_loss: str | None = None,
        balance_coef: float | None = None,
        z_loss_coef: float = 0.0,
        dispatch: str = "sorted",
        weighting: str | None = None,
        jitter_eps: float = 0.0,
        noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        check_positive_int("num_experts", num_experts)
        check_choice("router", router, ROUTER_KINDS)
        if router != "dense":  # the dense router uses every expert; top_k does not apply
            check_int_range("top_k", top_k, 1, num_experts)
        check_choice("expert", expert, EXPERT_KINDS)
        if capacity_factor is not None:
            check_positive("capacity_factor", capacity_factor)
        check_choice("balance_loss", balance_loss, BALANCE_LOSSES)
        if balance_coef is not None:
            check_nonnegative("balance_coef", balance_coef)
        check_nonnegative("z_loss_coef", z_loss_coef)
        check_choice("dispatch", dispatch, DISPATCH_KINDS)
        if weighting is not None:
            check_choice("weighting", weighting, WEIGHTINGS)
        check_nonnegative("jitter_eps", jitter_eps)
        check_nonnegative("noise_scale", noise_scale)
        if jitter_eps > 0 and router != "topk":
            raise ValueError(f"jitter_eps applies to router='topk' only, got router={router!r}")

        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = num_experts if router == "dense" else top_k
        self.capacity_factor = capacity_factor
        self.balance_loss = balance_loss
        self.balance_coef = (
            DEFAULT_BALANCE_COEF.get(balance_loss, 0.0) if balance_coef is None else balance_coef
        )
        self.z_loss_coef = float(z_loss_coef)
        self.dispatch = dispatch
        if weighting is None and top_k == 1:
            weighting = "raw"
        if router == "dense":
            self.router: DenseRouter = DenseRouter(d_model, num_experts)
        elif router == "topk":
            self.router = TopKRouter(
                d_model, num_experts, top_k, weighting or "renormalize", jitter_eps
            )
        else:
            self.router = NoisyTopKRouter(
                d_model, num_experts, top_k, weighting or "topk_softmax", noise_scale
            )
        self.router_kind = router
        self.experts = ExpertBank(num_experts, d_model, d_hidden, expert)

    def extra_repr(self) -> str:
        return (
            f"router={self.router_kind!r}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, dispatch={self.dispatch!r}"
        )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got dtype={x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}"
            )

    def aux_losses(self, routing: Routing) -> dict[str, Tensor]:
        """The configured losses, unweighted, from the routing record."""
        out: dict[str, Tensor] = {}
        if routing.num_tokens == 0:
            return out
        if self.balance_loss == "switch":
            out["switch"] = losses.switch_loss(routing)
        elif self.balance_loss == "importance":
            out["importance"] = losses.importance_loss(routing)
            out["load"] = losses.load_loss(routing)
        if self.z_loss_coef > 0:
            out["z"] = losses.z_loss(routing)
        return out

    def forward(self, x: Tensor) -> MoEOutput:
        """``x: [..., d_model]`` -> :class:`MoEOutput` with ``y: [..., d_model]``."""
        self._check_input(x)
        tokens = x.reshape(-1, self.d_model)  # [T, d_model]
        routing = apply_capacity(self.router(tokens), self.capacity_factor)
        if self.router_kind == "dense":
            y = dispatch_dense(tokens, routing, self.experts)
        else:
            y = DISPATCHERS[self.dispatch](tokens, routing, self.experts)
        parts = self.aux_losses(routing)
        aux = torch.zeros((), device=x.device, dtype=torch.float32)
        for name, value in parts.items():
            aux = aux + (self.z_loss_coef if name == "z" else self.balance_coef) * value
        return MoEOutput(y=y.reshape(x.shape), aux_loss=aux, routing=routing, losses=parts)
