"""The MoE layer: router -> capacity -> dispatch to experts -> combine, plus auxiliary losses.

:class:`MoEConfig` holds every choice, checked and resolved once (defaults that depend on other
choices are filled in, arguments a configuration would ignore are refused); :class:`MoE` builds
its parts from it and exposes it as ``layer.config``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_lib import losses
from moe_lib.activations import EXPERT_KINDS
from moe_lib.capacity import apply_capacity
from moe_lib.checks import (
    check_choice,
    check_int_range,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_real,
    check_tensor,
)
from moe_lib.dispatch import DISPATCH_KINDS, DISPATCHERS
from moe_lib.experts import ExpertBank
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
DEFAULT_TOP_K = 2


@dataclass(frozen=True)
class MoEConfig:
    """Every choice of an :class:`MoE` layer, checked when the config is made.

    Args:
        d_model: token width. d_hidden: hidden width of each expert.
        num_experts: E. top_k: experts per token, in [1, E]; None: 2 for the top-k routers, E
            for ``router="dense"`` (which uses every expert, so any other value is refused).
        expert: "relu" | "gelu" | "swiglu".
        router: "dense" (every expert runs) | "topk" | "noisy_topk".
        capacity_factor: None for dropless, or a finite float > 0: C = ceil(cf * tokens * k / E).
        balance_loss: None | "switch" | "importance" (Shazeer's importance + smooth load losses).
        balance_coef: weight of the balance loss; None: 1e-2 for "switch", 1e-1 for "importance";
            refused without a balance loss (and None then).
        z_loss_coef: weight of the ST-MoE router z-loss (1e-3 in the paper), >= 0.
        dispatch: "loop" (reference) | "sorted" (fast) | "dense" (every expert on every token);
            identical results. None: "dense" for ``router="dense"``, else "sorted".
        weighting: how top-k weights are normalised (see :func:`moe_lib.routing.topk_weights`);
            None: "raw" when top_k == 1 (Switch: a renormalised single weight is always 1, so
            the task loss would give the router no gradient), else "renormalize" for "topk"
            and "topk_softmax" for "noisy_topk". Refused for ``router="dense"``.
        jitter_eps: Switch router jitter in [0, 1) (``router="topk"`` only).
        noise_scale: multiplies the learned noise of ``router="noisy_topk"`` (refused for the
            other routers), >= 0; None: 1.0 for "noisy_topk".

    The config is frozen. After ``__post_init__`` every None that has a default holds the value
    used (None stays where an option does not apply), so ``MoE(**config.to_dict())`` rebuilds
    the same layer and ``dataclasses.replace(config, ...)`` checks the changed config again.
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int | None = None
    expert: str = "swiglu"
    router: str = "topk"
    capacity_factor: float | None = None
    balance_loss: str | None = None
    balance_coef: float | None = None
    z_loss_coef: float = 0.0
    dispatch: str | None = None
    weighting: str | None = None
    jitter_eps: float = 0.0
    noise_scale: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("d_hidden", self.d_hidden)
        check_positive_int("num_experts", self.num_experts)
        check_choice("router", self.router, ROUTER_KINDS)
        check_choice("expert", self.expert, EXPERT_KINDS)
        dense = self.router == "dense"
        if self.top_k is None:
            self._set("top_k", self.num_experts if dense else min(DEFAULT_TOP_K, self.num_experts))
        check_int_range("top_k", self.top_k, 1, self.num_experts)
        if dense and self.top_k != self.num_experts:
            raise ValueError(f"top_k must be None or num_experts={self.num_experts} for "
                             f"router='dense' (every expert runs), got {self.top_k}")
        if self.capacity_factor is not None:
            check_positive("capacity_factor", self.capacity_factor)
            self._set("capacity_factor", float(self.capacity_factor))
        check_choice("balance_loss", self.balance_loss, BALANCE_LOSSES)
        if self.balance_loss is None:
            if self.balance_coef is not None:
                raise ValueError("balance_coef applies to a balance loss, but balance_loss is "
                                 "None; pass balance_loss='switch' or 'importance', or drop it")
        elif self.balance_coef is None:
            self._set("balance_coef", DEFAULT_BALANCE_COEF[self.balance_loss])
        else:
            check_nonnegative("balance_coef", self.balance_coef)
            self._set("balance_coef", float(self.balance_coef))
        check_nonnegative("z_loss_coef", self.z_loss_coef)
        self._set("z_loss_coef", float(self.z_loss_coef))
        if self.dispatch is None:
            self._set("dispatch", "dense" if dense else "sorted")
        check_choice("dispatch", self.dispatch, DISPATCH_KINDS)
        self._resolve_weighting(dense)
        check_real("jitter_eps", self.jitter_eps, 0.0, 1.0, high_open=True)
        if self.jitter_eps > 0 and self.router != "topk":
            raise ValueError(f"jitter_eps applies to router='topk' only, got "
                             f"router={self.router!r}")
        self._set("jitter_eps", float(self.jitter_eps))
        if self.noise_scale is not None:
            check_nonnegative("noise_scale", self.noise_scale)
            if self.router != "noisy_topk":
                raise ValueError(f"noise_scale applies to router='noisy_topk' only, got "
                                 f"router={self.router!r}")
            self._set("noise_scale", float(self.noise_scale))
        elif self.router == "noisy_topk":
            self._set("noise_scale", 1.0)
        if self.balance_loss == "importance" and self.router != "noisy_topk":
            warnings.warn(
                "balance_loss='importance' without router='noisy_topk': the load loss then "
                "counts tokens, which carries no gradient; only the importance loss trains the "
                "router", UserWarning, stacklevel=4)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # the resolved value of a frozen field

    def _resolve_weighting(self, dense: bool) -> None:
        if dense:
            if self.weighting is not None:
                raise ValueError(f"weighting applies to the top-k routers; router='dense' "
                                 f"weights every expert by its softmax probability, got "
                                 f"weighting={self.weighting!r}")
            return
        if self.weighting is None:
            if self.top_k == 1:
                self._set("weighting", "raw")
            else:
                self._set("weighting", "renormalize" if self.router == "topk" else "topk_softmax")
        check_choice("weighting", self.weighting, WEIGHTINGS)

    def to_dict(self) -> dict:
        """The fields as a dict: ``MoE(**config.to_dict())`` rebuilds the layer."""
        return asdict(self)


class ParameterCounts(NamedTuple):
    """Parameters of a layer: ``total`` (all experts) and ``active`` (used for one token)."""

    total: int
    active: int


@dataclass
class MoEOutput:
    """What an MoE layer returns.

    ``y: [..., d_model]`` in the input's dtype; ``aux_loss``: a scalar, the configured losses
    weighted by their coefficients (zero if none), float32 (float64 for float64 input, like the
    router's maths); ``routing``: the :class:`Routing` record (over the flattened
    ``[tokens, ...]``); ``losses``: each configured loss, unweighted.
    """

    y: Tensor
    aux_loss: Tensor
    routing: Routing
    losses: dict[str, Tensor] = field(default_factory=dict)


def build_router(config: MoEConfig) -> DenseRouter:
    """The router a configuration asks for."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be an MoEConfig, got {type(config).__name__}")
    if config.router == "dense":
        return DenseRouter(config.d_model, config.num_experts)
    if config.router == "topk":
        return TopKRouter(config.d_model, config.num_experts, config.top_k, config.weighting,
                          config.jitter_eps)
    return NoisyTopKRouter(config.d_model, config.num_experts, config.top_k, config.weighting,
                           config.noise_scale)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer: ``x: [..., d_model] -> MoEOutput``.

    The keyword arguments are those of :class:`MoEConfig` (which documents them);
    ``MoE.from_config(config)`` builds the same layer from a config.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int | None = None,
        expert: str = "swiglu",
        router: str = "topk",
        capacity_factor: float | None = None,
        balance_loss: str | None = None,
        balance_coef: float | None = None,
        z_loss_coef: float = 0.0,
        dispatch: str | None = None,
        weighting: str | None = None,
        jitter_eps: float = 0.0,
        noise_scale: float | None = None,
    ) -> None:
        super().__init__()
        config = MoEConfig(
            d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, top_k=top_k,
            expert=expert, router=router, capacity_factor=capacity_factor,
            balance_loss=balance_loss, balance_coef=balance_coef, z_loss_coef=z_loss_coef,
            dispatch=dispatch, weighting=weighting, jitter_eps=jitter_eps,
            noise_scale=noise_scale,
        )
        self.config = config
        self.router = build_router(config)
        self.experts = ExpertBank(config.num_experts, config.d_model, config.d_hidden,
                                  config.expert)

    @classmethod
    def from_config(cls, config: MoEConfig) -> MoE:
        """The layer of a :class:`MoEConfig`."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be an MoEConfig, got {type(config).__name__}")
        return cls(**config.to_dict())

    # Read-only views of the config, for code that reads ``layer.top_k`` and the like.
    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def capacity_factor(self) -> float | None:
        return self.config.capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        """Change the capacity of a built layer (same weights): the config is checked again."""
        self.config = replace(self.config, capacity_factor=value)

    @property
    def dispatch(self) -> str:
        return self.config.dispatch

    def extra_repr(self) -> str:
        c = self.config
        return (f"router={c.router!r}, top_k={c.top_k}, capacity_factor={c.capacity_factor}, "
                f"dispatch={c.dispatch!r}")

    def parameter_counts(self) -> ParameterCounts:
        """``total``: router + all E experts; ``active``: router + the k experts a token uses."""
        router = sum(p.numel() for p in self.router.parameters())
        per_expert = self.experts.params_per_expert()
        return ParameterCounts(total=router + self.num_experts * per_expert,
                               active=router + self.top_k * per_expert)

    def _check_input(self, x: Tensor) -> None:
        check_tensor("x", x, kind="float", device=self.router.gate.weight.device)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}"
            )

    def aux_losses(self, routing: Routing) -> dict[str, Tensor]:
        """The configured losses, unweighted, from the routing record (none for zero tokens)."""
        if not isinstance(routing, Routing):
            raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
        c = self.config
        out: dict[str, Tensor] = {}
        if routing.num_tokens == 0:
            return out
        if c.balance_loss == "switch":
            out["switch"] = losses.switch_loss(routing)
        elif c.balance_loss == "importance":
            out["importance"] = losses.importance_loss(routing)
            out["load"] = losses.load_loss(routing)
        if c.z_loss_coef > 0:
            out["z"] = losses.z_loss(routing)
        return out

    def forward(self, x: Tensor) -> MoEOutput:
        """``x: [..., d_model]`` -> :class:`MoEOutput` with ``y: [..., d_model]``."""
        self._check_input(x)
        c = self.config
        tokens = x.reshape(-1, c.d_model)  # [T, d_model]
        routing = apply_capacity(self.router(tokens), c.capacity_factor)
        y = DISPATCHERS[c.dispatch](tokens, routing, self.experts)
        parts = self.aux_losses(routing)
        aux = torch.zeros((), device=x.device, dtype=torch.float32)
        for name, value in parts.items():
            aux = aux + (c.z_loss_coef if name == "z" else c.balance_coef) * value
        return MoEOutput(y=y.reshape(x.shape), aux_loss=aux, routing=routing, losses=parts)
