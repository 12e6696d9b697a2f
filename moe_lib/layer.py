"""The MoE layer: router -> capacity -> dispatch to experts -> combine (+ shared experts), plus
auxiliary losses. :class:`MoE` is built from a :class:`~moe_lib.config.MoEConfig`, which it
exposes as ``layer.config``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_lib import losses
from moe_lib.capacity import apply_capacity
from moe_lib.checks import check_tensor
from moe_lib.config import MoEConfig
from moe_lib.dispatch import DISPATCHERS
from moe_lib.experts import ExpertBank
from moe_lib.routers import DenseRouter, ExpertChoiceRouter, NoisyTopKRouter, TopKRouter
from moe_lib.routing import Routing, with_groups
from moe_lib.shared import SharedExperts


class ParameterCounts(NamedTuple):
    """Parameters of a layer: ``total`` (all experts) and ``active`` (used for one token)."""

    total: int
    active: int


@dataclass
class MoEOutput:
    """What an MoE layer returns.

    ``y: [..., d_model]`` in the input's dtype (zeros at padded positions); ``aux_loss``: a
    scalar, the configured losses weighted by their coefficients (zero if none), float32
    (float64 for float64 input, like the router's maths); ``routing``: the :class:`Routing`
    record over the routed tokens (the flattened ``[tokens, ...]``, padding left out);
    ``losses``: each configured loss, unweighted.
    """

    y: Tensor
    aux_loss: Tensor
    routing: Routing
    losses: dict[str, Tensor] = field(default_factory=dict)


def build_router(config: MoEConfig) -> DenseRouter:
    """The router a configuration asks for."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be an MoEConfig, got {type(config).__name__}")
    c = config
    if c.router == "dense":
        return DenseRouter(c.d_model, c.num_experts, bias=c.router_bias)
    if c.router == "expert_choice":
        return ExpertChoiceRouter(c.d_model, c.num_experts, c.capacity_factor, bias=c.router_bias)
    if c.router == "noisy_topk":
        return NoisyTopKRouter(c.d_model, c.num_experts, c.top_k, c.weighting, c.noise_scale,
                               bias=c.router_bias)
    return TopKRouter(c.d_model, c.num_experts, c.top_k, c.weighting, c.jitter_eps,
                      score=c.score, n_group=c.n_group, topk_group=c.topk_group,
                      selection_bias=c.selection_bias,
                      routed_scaling_factor=c.routed_scaling_factor, bias=c.router_bias)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer: ``x: [..., d_model] -> MoEOutput``.

    The arguments are those of :class:`~moe_lib.config.MoEConfig` (which documents each one);
    the first fourteen are named here, the newer options (score, n_group, topk_group,
    selection_bias, routed_scaling_factor, router_bias, capacity, capacity_per, n_shared,
    d_shared, shared_gate, expert_bias, swiglu_alpha, swiglu_limit) pass through ``**options``.
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
        **options: object,
    ) -> None:
        super().__init__()
        config = MoEConfig(
            d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, top_k=top_k,
            expert=expert, router=router, capacity_factor=capacity_factor,
            balance_loss=balance_loss, balance_coef=balance_coef, z_loss_coef=z_loss_coef,
            dispatch=dispatch, weighting=weighting, jitter_eps=jitter_eps,
            noise_scale=noise_scale, **options,
        )
        self.config = config
        self.router = build_router(config)
        self.experts = ExpertBank(config.num_experts, config.d_model, config.d_hidden,
                                  config.activation(), bias=config.expert_bias)
        self.shared = None
        if config.n_shared:
            self.shared = SharedExperts(config.d_model, config.d_shared, config.n_shared,
                                        config.activation(), gate=config.shared_gate)

    @classmethod
    def from_config(cls, config: MoEConfig) -> MoE:
        """The layer of a :class:`MoEConfig`."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be an MoEConfig, got {type(config).__name__}")
        return cls(**config.to_dict())

    @classmethod
    def from_hf(cls, block: nn.Module, **options: object) -> MoE:
        """The layer of a Hugging Face MoE block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
        Switch Transformers, gpt-oss) with its weights, dtype and device, giving the block's
        results: see :func:`moe_lib.interop.from_hf` for ``options``."""
        # Imported here, not at the top: interop sits above this module, and importing moe_lib
        # must never import transformers (an optional extra).
        from moe_lib.interop import from_hf

        return from_hf(block, **options)

    def to_hf(self, family: str, *, drop_losses: bool = False) -> nn.Module:
        """The Hugging Face block of ``family`` ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
        "deepseek_v3", "switch_transformers", "gpt_oss") with this layer's weights: see
        :func:`moe_lib.interop.to_hf`."""
        # Imported here for the same reasons as in from_hf.
        from moe_lib.interop import to_hf

        return to_hf(self, family, drop_losses=drop_losses)

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
        """``total``: router + all E experts + shared experts; ``active``: router + the experts
        one token uses (k routed; for expert choice c = capacity_factor on average, rounded) +
        shared experts."""
        router = sum(p.numel() for p in self.router.parameters())
        shared = 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())
        per_expert = self.experts.params_per_expert()
        c = self.config
        per_token = c.capacity_factor if c.router == "expert_choice" else c.top_k
        return ParameterCounts(total=router + self.num_experts * per_expert + shared,
                               active=router + round(per_token * per_expert) + shared)

    @torch.no_grad()
    def update_selection_bias(self, gamma: float) -> Tensor:
        """DeepSeek-V3's auxiliary-loss-free update of the selection bias, after the optimizer
        step (see :meth:`moe_lib.routers.TopKRouter.update_selection_bias`)."""
        if not isinstance(self.router, TopKRouter) or not self.router.has_selection_bias:
            raise ValueError("update_selection_bias needs a layer built with "
                             "selection_bias=True")
        return self.router.update_selection_bias(gamma)

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
        elif c.balance_loss == "switch_per_sequence":
            out["switch"] = losses.switch_loss(routing, per_group=True)
        elif c.balance_loss == "sequence_wise":
            out["sequence_wise"] = losses.sequence_balance_loss(routing)
        elif c.balance_loss == "importance":
            out["importance"] = losses.importance_loss(routing)
            out["load"] = losses.load_loss(routing)
        if c.z_loss_coef > 0:
            out["z"] = losses.z_loss(routing)
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MoEOutput:
        """``x: [..., d_model]`` -> :class:`MoEOutput` with ``y: [..., d_model]``.

        ``mask``: shaped like ``x`` without its last dimension, True (or 1) for a real token as
        in Hugging Face's ``attention_mask``. Padded tokens are not routed, take no capacity,
        count in no loss, and come out as zeros. For ``x: [..., S, d_model]`` each sequence of
        S tokens is a group (capacity per sequence, sequence-wise losses).
        """
        c = self.config
        tokens, rows, routing = _route_tokens(self.router, x, mask, c.d_model)
        routing = apply_capacity(routing, c.capacity_factor if c.router != "expert_choice"
                                 else None, capacity=c.capacity,
                                 per_group=c.capacity_per == "sequence")
        y = DISPATCHERS[c.dispatch](tokens, routing, self.experts)
        if self.shared is not None:
            y = y + self.shared(tokens).to(y.dtype)
        return _layer_output(x, y, rows, routing, self.aux_losses(routing), c)


def _route_tokens(router: nn.Module, x: Tensor, mask: Tensor | None, d_model: int
                  ) -> tuple[Tensor, Tensor | None, Routing]:
    """What :class:`MoE` and :class:`moe_lib.parallel.ExpertParallelMoE` do before their experts:
    check ``x: [..., d_model]`` and ``mask`` (shaped like ``x`` without its last dimension,
    bool or 0/1), keep the real tokens, and route them with their sequences as groups.

    Returns ``tokens: [T_real, d_model]``, ``rows: [T_real]`` (their places among the ``T``
    flattened positions; None without a mask) and the router's :class:`Routing` for them.
    """
    check_tensor("x", x, kind="float", device=router.gate.weight.device)
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [..., d_model={d_model}], got {tuple(x.shape)}")
    if mask is not None:
        check_tensor("mask", mask, kind=("bool", "int"), shape=tuple(x.shape[:-1]),
                     device=x.device)
        if mask.dtype != torch.bool:
            if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold 1 (a real token) or 0 (padding) only")
            mask = mask.bool()
    tokens = x.reshape(-1, d_model)  # [T, d_model]
    groups, num_groups = _sequence_groups(x)
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).nonzero().squeeze(1)  # the real tokens
        tokens = tokens.index_select(0, rows)
        groups = None if groups is None else groups.index_select(0, rows)
    routing = router(tokens)
    if groups is not None:  # a router's record has one group already
        routing = with_groups(routing, groups, num_groups)
    return tokens, rows, routing


def _layer_output(x: Tensor, y: Tensor, rows: Tensor | None, routing: Routing,
                  parts: dict[str, Tensor], config: MoEConfig) -> MoEOutput:
    """The :class:`MoEOutput` of ``y: [T_real, d_model]`` for ``x: [..., d_model]``: zeros at
    the padded positions (``rows`` from :func:`_route_tokens`), and ``aux_loss = balance_coef *
    (balance losses) + z_loss_coef * z``, from the unweighted ``parts``."""
    aux = torch.zeros((), device=x.device, dtype=torch.float32)
    for name, value in parts.items():
        aux = aux + (config.z_loss_coef if name == "z" else config.balance_coef) * value
    if rows is not None:
        y = y.new_zeros(x.shape[:-1].numel(), config.d_model).index_copy(0, rows, y)
    return MoEOutput(y=y.reshape(x.shape), aux_loss=aux, routing=routing, losses=parts)


def _sequence_groups(x: Tensor) -> tuple[Tensor | None, int]:
    """For ``x: [..., S, d]`` with at least one leading dimension, the sequence of each of its
    tokens (``[T]`` int64) and the number of sequences; (None, 1) for ``[S, d]`` or ``[d]``."""
    if x.dim() < 3:
        return None, 1
    S = x.shape[-2]
    num = math.prod(x.shape[:-2])
    groups = torch.arange(num, device=x.device).repeat_interleave(S)
    return groups, max(num, 1)
