"""``MoEConfig``: every choice of an MoE layer, checked and resolved once.

Defaults that depend on other choices are filled in when the config is made, and an argument
that the configuration would ignore is refused (or warned about), so a config says exactly what
the layer does. :class:`moe_lib.layer.MoE` is built from it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from moe_lib.activations import (
    EXPERT_KINDS,
    GPT_OSS_ALPHA,
    GPT_OSS_LIMIT,
    ExpertActivation,
    activation_spec,
)
from moe_lib.checks import (
    check_bool,
    check_choice,
    check_int,
    check_int_range,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_real,
)
from moe_lib.dispatch import DISPATCH_KINDS
from moe_lib.routers import ROUTER_KINDS
from moe_lib.routing import SCORES, WEIGHTINGS, check_group_limits

BALANCE_LOSSES = (None, "switch", "switch_per_sequence", "importance", "sequence_wise")
DEFAULT_BALANCE_COEF = {"switch": 1e-2, "switch_per_sequence": 1e-2, "importance": 1e-1,
                        "sequence_wise": 1e-4}
CAPACITY_PER = ("batch", "sequence")
DEFAULT_TOP_K = 2


@dataclass(frozen=True)
class MoEConfig:
    """Every choice of an :class:`~moe_lib.layer.MoE` layer, checked when the config is made.

    Sizes and experts:
        d_model: token width. d_hidden: hidden width of each expert. num_experts: E.
        expert: "relu" | "gelu" | "swiglu" | "clamped_swiglu" (gpt-oss).
        expert_bias: biases in the experts' two projections (gpt-oss).
        swiglu_alpha, swiglu_limit: alpha and limit of "clamped_swiglu" (None: 1.702 and 7.0, as
            gpt-oss); refused for the other kinds.
        n_shared: always-on shared experts (DeepSeekMoE, Qwen2-MoE), outside capacity; 0: none.
        d_shared: hidden width of each shared expert (None: d_hidden; only with n_shared).
        shared_gate: scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE; DeepSeek's
            are ungated); only with n_shared.

    Router (score -> select -> weight, :mod:`moe_lib.routing`):
        router: "dense" (every expert runs) | "topk" | "noisy_topk" | "expert_choice".
        top_k: experts per token, in [1, E]; None: 2 for the top-k routers, E for "dense"
            (which uses every expert, so another value is refused); refused for expert choice.
        score: "softmax" | "sigmoid" (DeepSeek-V3); sigmoid for router="topk" only.
        weighting: "renormalize" | "topk_softmax" | "raw"; None: "raw" when top_k == 1 (Switch:
            a renormalised single weight is always 1, so the task loss would give the router no
            gradient), else "renormalize" for "topk" and "topk_softmax" for "noisy_topk".
            Refused for the dense and expert-choice routers.
        routed_scaling_factor: multiplies the gate weights (> 0; 2.5 in DeepSeek-V3; "topk").
        n_group, topk_group: group-limited selection (DeepSeek-V3; "topk" only, both or neither).
        selection_bias: a per-expert bias for choosing only, moved by
            :meth:`~moe_lib.layer.MoE.update_selection_bias` ("topk" only).
        router_bias: a learned bias on the router logits (Switch, gpt-oss).
        jitter_eps: Switch router jitter in [0, 1) ("topk" only).
        noise_scale: multiplies the learned noise of "noisy_topk" (refused for the other
            routers), >= 0; None: 1.0 for "noisy_topk".

    Capacity (:mod:`moe_lib.capacity`):
        capacity_factor: None for dropless, or a finite float > 0: C = ceil(cf * n * k / E) for
            n tokens. For expert choice it is required: c, each expert takes ceil(c T / E)
            tokens (Zhou et al.).
        capacity: C as a whole number of slots (>= 1) instead of a factor (token choice only).
        capacity_per: "batch" (pooled) | "sequence" (each sequence of ``x: [..., S, d_model]``
            has its own C slots, as GShard and Switch Transformers).

    Losses:
        balance_loss: None | "switch" | "switch_per_sequence" (Switch's loss per sequence,
            averaged, as Hugging Face's Switch Transformers) | "importance" (Shazeer's importance
            + smooth load losses) | "sequence_wise" (DeepSeek-V3's sequence-wise loss).
        balance_coef: weight of the balance loss; None: 1e-2 for the Switch losses, 1e-1 for
            "importance", 1e-4 for "sequence_wise"; refused without a balance loss.
        z_loss_coef: weight of the ST-MoE router z-loss (1e-3 in the paper), >= 0.

    Execution:
        dispatch: "loop" (reference) | "sorted" (fast) | "dense" (every expert on every token);
            identical results. None: "dense" for router="dense", else "sorted".

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
    score: str = "softmax"
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    selection_bias: bool = False
    router_bias: bool = False
    capacity: int | None = None
    capacity_per: str = "batch"
    n_shared: int = 0
    d_shared: int | None = None
    shared_gate: bool = False
    expert_bias: bool = False
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("d_hidden", self.d_hidden)
        check_positive_int("num_experts", self.num_experts)
        check_choice("router", self.router, ROUTER_KINDS)
        check_choice("expert", self.expert, EXPERT_KINDS)
        self._check_expert_options()
        self._check_top_k()
        self._check_router_options()
        self._check_capacity()
        self._check_losses()
        self._check_shared()
        if self.dispatch is None:
            self._set("dispatch", "dense" if self.router == "dense" else "sorted")
        check_choice("dispatch", self.dispatch, DISPATCH_KINDS)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # the resolved value of a frozen field

    def _only_for(self, name: str, routers: tuple[str, ...], unset: bool) -> None:
        """Refuse an option that the router would ignore."""
        if not unset and self.router not in routers:
            allowed = " or ".join(repr(r) for r in routers)
            raise ValueError(f"{name} applies to router={allowed} only, got "
                             f"router={self.router!r}")

    def _check_expert_options(self) -> None:
        check_bool("expert_bias", self.expert_bias)
        for name, default in (("swiglu_alpha", GPT_OSS_ALPHA), ("swiglu_limit", GPT_OSS_LIMIT)):
            value = getattr(self, name)
            if self.expert != "clamped_swiglu":
                if value is not None:
                    raise ValueError(f"{name} applies to expert='clamped_swiglu' only, got "
                                     f"expert={self.expert!r}")
                continue
            if value is None:
                value = default
            check_positive(name, value)
            self._set(name, float(value))

    def activation(self) -> ExpertActivation:
        """The experts' :class:`~moe_lib.activations.ExpertActivation` (kind and parameters)."""
        if self.expert != "clamped_swiglu":
            return activation_spec(self.expert)
        return activation_spec(self.expert, alpha=self.swiglu_alpha, limit=self.swiglu_limit)

    def _check_top_k(self) -> None:
        E = self.num_experts
        if self.router == "expert_choice":
            if self.top_k is not None:
                raise ValueError("top_k does not apply to router='expert_choice' (each expert "
                                 "takes its tokens); set capacity_factor instead")
            self._set("top_k", E)  # E slots per token, the experts' choices mark which run
            return
        if self.top_k is None:
            self._set("top_k", E if self.router == "dense" else min(DEFAULT_TOP_K, E))
        check_int_range("top_k", self.top_k, 1, E)
        if self.router == "dense" and self.top_k != E:
            raise ValueError(f"top_k must be None or num_experts={E} for router='dense' (every "
                             f"expert runs), got {self.top_k}")

    def _check_router_options(self) -> None:
        check_choice("score", self.score, SCORES)
        self._only_for("score='sigmoid'", ("topk",), self.score == "softmax")
        check_positive("routed_scaling_factor", self.routed_scaling_factor)
        self._set("routed_scaling_factor", float(self.routed_scaling_factor))
        self._only_for("routed_scaling_factor", ("topk",), self.routed_scaling_factor == 1.0)
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("n_group and topk_group go together: give both or neither, got "
                             f"n_group={self.n_group!r}, topk_group={self.topk_group!r}")
        self._only_for("n_group", ("topk",), self.n_group is None)
        if self.n_group is not None:
            check_group_limits(self.num_experts, self.top_k, self.n_group, self.topk_group)
        check_bool("selection_bias", self.selection_bias)
        self._only_for("selection_bias", ("topk",), not self.selection_bias)
        check_bool("router_bias", self.router_bias)
        check_real("jitter_eps", self.jitter_eps, 0.0, 1.0, high_open=True)
        self._set("jitter_eps", float(self.jitter_eps))
        self._only_for("jitter_eps", ("topk",), self.jitter_eps == 0)
        if self.noise_scale is not None:
            check_nonnegative("noise_scale", self.noise_scale)
            self._only_for("noise_scale", ("noisy_topk",), False)
            self._set("noise_scale", float(self.noise_scale))
        elif self.router == "noisy_topk":
            self._set("noise_scale", 1.0)
        self._resolve_weighting()

    def _resolve_weighting(self) -> None:
        if self.router in ("dense", "expert_choice"):
            if self.weighting is not None:
                raise ValueError(f"weighting applies to the top-k routers; router="
                                 f"{self.router!r} weights an expert by its softmax "
                                 f"probability, got weighting={self.weighting!r}")
            return
        if self.weighting is None:
            if self.top_k == 1:
                self._set("weighting", "raw")
            else:
                self._set("weighting", "renormalize" if self.router == "topk" else "topk_softmax")
        check_choice("weighting", self.weighting, WEIGHTINGS)

    def _check_capacity(self) -> None:
        if self.capacity_factor is not None:
            check_positive("capacity_factor", self.capacity_factor)
            self._set("capacity_factor", float(self.capacity_factor))
        if self.capacity is not None:
            check_int("capacity", self.capacity, low=1)
            if self.capacity_factor is not None:
                raise ValueError("give capacity_factor or capacity (a number of slots), not both")
        check_choice("capacity_per", self.capacity_per, CAPACITY_PER)
        if self.router == "expert_choice":
            if self.capacity_factor is None:
                raise ValueError("router='expert_choice' needs capacity_factor, c > 0: each "
                                 "expert takes ceil(c * tokens / E) tokens")
            self._only_for("capacity", ("dense", "topk", "noisy_topk"), self.capacity is None)
            self._only_for("capacity_per='sequence'", ("dense", "topk", "noisy_topk"),
                           self.capacity_per == "batch")
        dropless = self.capacity_factor is None and self.capacity is None
        if self.capacity_per == "sequence" and dropless:
            raise ValueError("capacity_per='sequence' needs capacity_factor or capacity; "
                             "without either the layer is dropless")

    def _check_losses(self) -> None:
        check_choice("balance_loss", self.balance_loss, BALANCE_LOSSES)
        if self.balance_loss is not None and self.router == "expert_choice":
            raise ValueError("balance_loss does not apply to router='expert_choice': every "
                             "expert takes the same number of tokens by construction")
        if self.balance_loss is None:
            if self.balance_coef is not None:
                raise ValueError("balance_coef applies to a balance loss, but balance_loss is "
                                 "None; pass balance_loss='switch' (or another), or drop it")
        elif self.balance_coef is None:
            self._set("balance_coef", DEFAULT_BALANCE_COEF[self.balance_loss])
        else:
            check_nonnegative("balance_coef", self.balance_coef)
            self._set("balance_coef", float(self.balance_coef))
        check_nonnegative("z_loss_coef", self.z_loss_coef)
        self._set("z_loss_coef", float(self.z_loss_coef))
        if self.balance_loss == "importance" and self.router != "noisy_topk":
            warnings.warn(
                "balance_loss='importance' without router='noisy_topk': the load loss then "
                "counts tokens, which carries no gradient; only the importance loss trains the "
                "router", UserWarning, stacklevel=5)

    def _check_shared(self) -> None:
        check_int("n_shared", self.n_shared, low=0)
        check_bool("shared_gate", self.shared_gate)
        if self.n_shared == 0:
            if self.d_shared is not None or self.shared_gate:
                raise ValueError("d_shared and shared_gate apply to shared experts; set "
                                 "n_shared >= 1 or drop them")
            return
        if self.d_shared is None:
            self._set("d_shared", self.d_hidden)
        check_positive_int("d_shared", self.d_shared)

    def to_dict(self) -> dict:
        """The fields as a dict: ``MoE(**config.to_dict())`` rebuilds the layer."""
        return asdict(self)
