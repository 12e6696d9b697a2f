"""Hugging Face MoE blocks into moe_lib and back, with identical results.

- :func:`from_hf` builds an :class:`~moe_lib.layer.MoE` from a block of ``transformers`` (5.x),
  with the block's weights, dtype and device;
- :func:`to_hf` builds the Hugging Face block of a family from a layer;
- :func:`state_from_hf` / :func:`state_to_hf` map tensors between the two layouts by name (also
  gradients: every map is a transpose, a split or a column permutation).

``transformers`` is an optional dependency (``pip install "moe_lib[hf]"``): nothing here imports
it at import time, and :func:`from_hf` never imports it (it reads the block it is given).

A block that holds or does something moe_lib cannot express is refused with a ValueError naming
the field, never approximated; so is a layer option that a family cannot express in
:func:`to_hf`. H: hidden size, I: an expert's width, E: experts, k: experts per token.

===================  ===========================  ============================================
family               block                        router -> moe_lib
===================  ===========================  ============================================
mixtral              MixtralSparseMoeBlock        softmax, top-k, renormalise
qwen2_moe            Qwen2MoeSparseMoeBlock       softmax, top-k, norm_topk_prob; gated shared
qwen3_moe            Qwen3MoeSparseMoeBlock       softmax, top-k, norm_topk_prob
olmoe                OlmoeSparseMoeBlock          softmax, top-k, norm_topk_prob
deepseek_v3          DeepseekV3MoE                sigmoid, groups, selection bias, scale; shared
switch_transformers  SwitchTransformersSparseMLP  softmax, top-1, raw; capacity per sequence
gpt_oss              GptOssMLP                    logit bias, top-k then softmax; clamped SwiGLU
===================  ===========================  ============================================

Precision: Hugging Face computes some routers in float32 whatever the block's dtype (the
softmax of Mixtral, Qwen and OLMoE; all of DeepSeek-V3's router; Switch's at ``router_dtype``),
where moe_lib's router runs in float64 for a float64 layer: the results agree to float32
rounding there, to float64 rounding elsewhere (tests/test_interop.py measures both).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from moe_lib.checks import check_bool, check_choice, check_type
from moe_lib.config import MoEConfig
from moe_lib.layer import MoE

PASS_THROUGH = ("balance_loss", "balance_coef", "z_loss_coef", "dispatch")
"""The :class:`MoE` options :func:`from_hf` accepts: the block itself says everything else."""

JITTER = (None, "router_only", "off")
""":func:`from_hf`'s ``jitter``: None refuses a block with router jitter; "router_only" keeps it
on the router's input (moe_lib's ``jitter_eps``); "off" builds the layer without it."""

Rule = tuple[str, tuple[str, ...], Callable[[Tensor], tuple[Tensor, ...]], Callable[..., Tensor]]
"""One moe_lib tensor <-> Hugging Face tensors: (moe_lib name, HF names, to HF, from HF)."""


@dataclass(frozen=True)
class _Options:
    """:func:`from_hf`'s keywords, checked, for the readers."""

    family: str
    jitter: str | None
    drop_expert_dropout: bool


@dataclass(frozen=True)
class Family:
    """A Hugging Face MoE family: its block and config classes, the reader (block -> MoE
    keyword arguments, refusing what moe_lib cannot express), the writer (MoEConfig -> HF
    config keyword arguments, refusing what the family cannot express), the tensor rules
    (``rules(num_experts)``), the HF tensors that :func:`to_hf` fills with zeros when the
    layer lacks them (gpt-oss's biases, DeepSeek-V3's correction bias: zeros are the same
    block), and the router tensors whose forward accepts a dtype wider than the block's (kept
    wide by :func:`to_hf` when the layer's are)."""

    block: str
    config: str
    read: Callable[[nn.Module, _Options], dict]
    write: Callable[[MoEConfig, bool], dict]
    rules: Callable[[int], list[Rule]]
    zero_fill: tuple[str, ...] = ()
    keep_wide: tuple[str, ...] = ()
    has_jitter: bool = False
    has_dropout: bool = False


# --------------------------------------------------------------------------------------------
# Tensor rules


def _same(t: Tensor) -> tuple[Tensor]:
    return (t,)


def _one(t: Tensor) -> Tensor:
    return t


def _transposed(t: Tensor) -> tuple[Tensor]:
    return (t.transpose(-2, -1),)


def _untransposed(t: Tensor) -> Tensor:
    return t.transpose(-2, -1)


def _split_gate_up(w_in: Tensor) -> tuple[Tensor, Tensor]:
    """``w_in: [H, 2W]`` (gate | up) -> the two nn.Linear weights ``[W, H]``."""
    gate, up = w_in.chunk(2, dim=-1)
    return gate.t(), up.t()


def _join_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    return torch.cat((gate.t(), up.t()), dim=-1)


def _interleave(t: Tensor) -> tuple[Tensor]:
    """moe_lib's side-by-side ``[..., gate | up]`` -> gpt-oss's ``[..., g0 u0 g1 u1 ...]``."""
    gate, up = t.chunk(2, dim=-1)
    return (torch.stack((gate, up), dim=-1).flatten(-2),)


def _deinterleave(t: Tensor) -> Tensor:
    return torch.cat((t[..., ::2], t[..., 1::2]), dim=-1)


def _unstack_t(t: Tensor) -> tuple[Tensor, ...]:
    """``[E, a, b]`` -> E nn.Linear weights ``[b, a]``."""
    return tuple(w.t() for w in t.unbind(0))


def _stack_t(*ws: Tensor) -> Tensor:
    return torch.stack([w.t() for w in ws])


_ROUTER = ("router.gate.weight", ("gate.weight",), _same, _one)
_STACKED = [("experts.w_in", ("experts.gate_up_proj",), _transposed, _untransposed),
            ("experts.w_out", ("experts.down_proj",), _transposed, _untransposed)]


def _mlp_rules(prefix: str) -> list[Rule]:
    """A shared SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``: nn.Linear without bias)."""
    return [("shared.ffn.w_in", (f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"),
             _split_gate_up, _join_gate_up),
            ("shared.ffn.w_out", (f"{prefix}.down_proj.weight",), _transposed, _untransposed)]


def _stacked_rules(num_experts: int) -> list[Rule]:
    """Mixtral, Qwen3-MoE, OLMoE: ``gate.weight [E, H]``; ``experts.gate_up_proj [E, 2I, H]``
    (gate rows, then up rows) = ``w_in [E, H, 2I]`` transposed; ``experts.down_proj [E, H, I]``
    = ``w_out [E, I, H]`` transposed."""
    return [_ROUTER, *_STACKED]


def _qwen2_moe_rules(num_experts: int) -> list[Rule]:
    """The stacked layout, plus ``shared_expert.{gate,up,down}_proj.weight`` (``[W, H]``,
    ``[W, H]``, ``[H, W]``) and ``shared_expert_gate.weight [1, H]``."""
    return [_ROUTER, *_STACKED, *_mlp_rules("shared_expert"),
            ("shared.gate.weight", ("shared_expert_gate.weight",), _same, _one)]


def _deepseek_v3_rules(num_experts: int) -> list[Rule]:
    """The stacked layout, plus ``gate.e_score_correction_bias [E]`` (moe_lib's selection-bias
    buffer) and the ungated ``shared_experts.{gate,up,down}_proj.weight``."""
    return [_ROUTER, ("router.selection_bias", ("gate.e_score_correction_bias",), _same, _one),
            *_STACKED, *_mlp_rules("shared_experts")]


def _switch_rules(num_experts: int) -> list[Rule]:
    """``router.classifier.weight [E, H]`` (and ``.bias [E]``); one nn.Linear pair per expert:
    ``experts.expert_{i}.wi.weight [I, H]`` = ``w_in[i]`` transposed, ``wo.weight [H, I]`` =
    ``w_out[i]`` transposed."""
    names = range(num_experts)
    return [("router.gate.weight", ("router.classifier.weight",), _same, _one),
            ("router.gate.bias", ("router.classifier.bias",), _same, _one),
            ("experts.w_in", tuple(f"experts.expert_{i}.wi.weight" for i in names),
             _unstack_t, _stack_t),
            ("experts.w_out", tuple(f"experts.expert_{i}.wo.weight" for i in names),
             _unstack_t, _stack_t)]


def _gpt_oss_rules(num_experts: int) -> list[Rule]:
    """``router.weight [E, H]``, ``router.bias [E]``; ``experts.gate_up_proj [E, H, 2I]`` and
    ``gate_up_proj_bias [E, 2I]`` with gate and up columns interleaved (``[..., ::2]`` gate,
    ``[..., 1::2]`` up) = ``w_in`` / ``b_in`` (side by side) with the columns permuted;
    ``experts.down_proj [E, I, H]`` = ``w_out``, ``down_proj_bias [E, H]`` = ``b_out``."""
    return [("router.gate.weight", ("router.weight",), _same, _one),
            ("router.gate.bias", ("router.bias",), _same, _one),
            ("experts.w_in", ("experts.gate_up_proj",), _interleave, _deinterleave),
            ("experts.b_in", ("experts.gate_up_proj_bias",), _interleave, _deinterleave),
            ("experts.w_out", ("experts.down_proj",), _same, _one),
            ("experts.b_out", ("experts.down_proj_bias",), _same, _one)]


def _num_experts_moe(state: dict[str, Tensor]) -> int:
    for name in ("router.gate.weight", "router.gate.bias", "experts.w_in", "experts.w_out"):
        if name in state:
            return state[name].shape[0]
    return 0


def _num_experts_hf(state: dict[str, Tensor]) -> int:
    """Switch's experts are numbered in their names; the other layouts do not need E."""
    ids = [int(n.split(".")[1].removeprefix("expert_")) for n in state
           if n.startswith("experts.expert_")]
    return max(ids, default=-1) + 1


def state_to_hf(family: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """moe_lib tensors by name (a layer's ``state_dict()``, or the gradients of some of its
    parameters) -> the same tensors in ``family``'s layout and names. Views where possible."""
    check_choice("family", family, tuple(FAMILIES))
    _check_state(state)
    out: dict[str, Tensor] = {}
    for moe, hf, to_hf_, _ in FAMILIES[family].rules(_num_experts_moe(state)):
        if moe in state:
            out.update(zip(hf, to_hf_(state[moe]), strict=True))
    _check_all_used(family, state, {rule[0] for rule in FAMILIES[family].rules(0)}, "moe_lib")
    return out


def state_from_hf(family: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``family``'s tensors by name (a block's ``state_dict()``, or gradients) -> moe_lib's."""
    check_choice("family", family, tuple(FAMILIES))
    _check_state(state)
    out: dict[str, Tensor] = {}
    rules = FAMILIES[family].rules(_num_experts_hf(state))
    for moe, hf, _, from_hf_ in rules:
        present = [name in state for name in hf]
        if all(present):
            out[moe] = from_hf_(*(state[name] for name in hf))
        elif any(present):
            missing = [name for name, p in zip(hf, present) if not p]
            raise ValueError(f"state holds part of {moe!r} only: missing {missing}")
    _check_all_used(family, state, {n for rule in rules for n in rule[1]}, "Hugging Face")
    return out


def _check_state(state: object) -> None:
    check_type("state", state, dict)
    for name, t in state.items():
        check_type(f"state[{name!r}]", t, Tensor)


def _check_all_used(family: str, state: dict, known: set[str], side: str) -> None:
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"{family}: no {side} tensor of this name in the family's layout: "
                         f"{unknown}")


# --------------------------------------------------------------------------------------------
# Reading blocks (from_hf)


def _refuse_block(family: str, what: str, why: str) -> NoReturn:
    raise ValueError(f"from_hf: this {family} block has {what}: {why}")


def _check_eager(experts: nn.Module, family: str) -> None:
    """The experts run transformers' default eager loop (``experts_implementation``)."""
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if impl not in (None, "eager"):
        _refuse_block(family, f"experts_implementation={impl!r}",
                      "from_hf converts the default 'eager' experts only; call "
                      "model.set_experts_implementation('eager') first")


def _check_silu(act: nn.Module, family: str, where: str, config: object = None) -> None:
    """The SwiGLU families gate with SiLU (``hidden_act`` "silu" or "swish")."""
    silu = isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                        and type(act).__module__ == "transformers.activations")
    if not silu:
        name = getattr(config, "hidden_act", None)
        shown = f"hidden_act={name!r}" if name is not None else "its activation"
        _refuse_block(family, f"{shown} ({type(act).__name__} in {where})",
                      "moe_lib's SwiGLU experts gate with SiLU (hidden_act='silu')")


def _jitter(value: float, options: _Options, when: str) -> float:
    """moe_lib's ``jitter_eps`` for a block whose ``router_jitter_noise`` is ``value``;
    ``when``: when Hugging Face's in-place jitter reaches the experts' input."""
    if not value:
        return 0.0
    if options.jitter is None:
        _refuse_block(options.family, f"router_jitter_noise={value}",
                      f"in training Hugging Face multiplies the hidden states by U(1-eps, 1+eps) "
                      f"in place, so the jitter also reaches the experts' input ({when}); "
                      f"moe_lib jitters the router's input only. Pass jitter='router_only' to "
                      f"build the layer with moe_lib's jitter, or jitter='off' to build it "
                      f"without")
    return float(value) if options.jitter == "router_only" else 0.0


def _read_stacked(block: nn.Module, options: _Options, renormalize: bool) -> dict:
    """A softmax top-k router ``block.gate`` and stacked SwiGLU experts ``block.experts``."""
    experts, gate = block.experts, block.gate
    _check_eager(experts, options.family)
    _check_silu(experts.act_fn, options.family, "experts.act_fn", getattr(experts, "config", None))
    E, H = gate.weight.shape
    return dict(d_model=H, d_hidden=experts.intermediate_dim, num_experts=E, top_k=gate.top_k,
                expert="swiglu", weighting="renormalize" if renormalize else "raw")


def _read_softmax_topk(block: nn.Module, options: _Options) -> dict:
    """Qwen3-MoE, OLMoE: softmax, top-k, renormalised if ``norm_topk_prob``."""
    return _read_stacked(block, options, bool(block.gate.norm_topk_prob))


def _read_mixtral(block: nn.Module, options: _Options) -> dict:
    """Mixtral always renormalises; its ``router_jitter_noise`` also scales the experts' input."""
    return dict(_read_stacked(block, options, True),
                jitter_eps=_jitter(block.jitter_noise, options, "always"))


def _read_qwen2_moe(block: nn.Module, options: _Options) -> dict:
    """Plus one shared expert of its own width, scaled by sigmoid(x . shared_expert_gate)."""
    kwargs = _read_softmax_topk(block, options)
    shared = block.shared_expert
    _check_silu(shared.act_fn, options.family, "shared_expert.act_fn", shared.config)
    if shared.intermediate_size < 1:
        _refuse_block(options.family, "shared_expert_intermediate_size=0",
                      "a shared expert of width 0 (build the layer without shared experts "
                      "yourself)")
    return dict(kwargs, n_shared=1, d_shared=shared.intermediate_size, shared_gate=True)


def _read_deepseek_v3(block: nn.Module, options: _Options) -> dict:
    """Sigmoid scores, group-limited top-k on scores + ``e_score_correction_bias``, weights
    from the scores (renormalised if ``norm_topk_prob``) times ``routed_scaling_factor``; an
    ungated shared MLP of width ``moe_intermediate_size * n_shared_experts``."""
    experts, gate, family = block.experts, block.gate, options.family
    _check_eager(experts, family)
    _check_silu(experts.act_fn, family, "experts.act_fn", block.config)
    _check_silu(block.shared_experts.act_fn, family, "shared_experts.act_fn", block.config)
    E, H = gate.weight.shape
    n_group, topk_group = _hf_groups(E, gate.num_group, gate.topk_group, family)
    d_hidden, n_shared = experts.intermediate_dim, block.config.n_shared_experts
    width = block.shared_experts.intermediate_size
    if n_shared < 1 or width != n_shared * d_hidden:
        _refuse_block(family, f"n_shared_experts={n_shared} with a shared MLP of width {width}",
                      f"moe_lib expects n_shared_experts >= 1 experts of width "
                      f"moe_intermediate_size={d_hidden}")
    return dict(d_model=H, d_hidden=d_hidden, num_experts=E, top_k=gate.top_k, expert="swiglu",
                score="sigmoid", weighting="renormalize" if gate.norm_topk_prob else "raw",
                routed_scaling_factor=float(gate.routed_scaling_factor), n_group=n_group,
                topk_group=topk_group, selection_bias=True, n_shared=n_shared, d_shared=d_hidden)


def _hf_groups(E: int, n_group: int | None, topk_group: int | None,
               family: str) -> tuple[int | None, int | None]:
    """DeepSeek-V3's ``n_group`` / ``topk_group`` as moe_lib's (one group: no grouping)."""
    if n_group is None or topk_group is None or n_group < 1 or E % n_group:
        _refuse_block(family, f"n_group={n_group!r}, topk_group={topk_group!r}",
                      f"Hugging Face's router needs n_group dividing the {E} experts")
    if E // n_group < 2:
        _refuse_block(family, f"n_group={n_group} groups of one expert",
                      "Hugging Face's router scores a group by its top-2 experts and fails")
    return (None, None) if n_group == 1 else (n_group, topk_group)


_SWITCH_ACTIVATIONS = {"ReLU": "relu", "GELUActivation": "gelu"}


def _act_names(act: nn.Module) -> str:
    """The ``dense_act_fn`` names of transformers that build ``act``'s class (the block keeps
    no config; transformers is loaded, since the block exists)."""
    table = getattr(sys.modules.get("transformers.activations"), "ACT2CLS", {})
    names = [name for name, spec in table.items()
             if (spec[0] if isinstance(spec, tuple) else spec) is type(act)]
    if type(act).__name__ == "GELUActivation":  # not F.gelu: the Python erf form
        names = [n for n in names if n != "gelu"]
    return " or ".join(repr(n) for n in names) or "?"


def _switch_activation(act: nn.Module, family: str) -> str:
    """``dense_act_fn`` "relu" (nn.ReLU) or "gelu" (exact erf GELU, as torch's F.gelu)."""
    kind = _SWITCH_ACTIVATIONS.get(type(act).__name__)
    exact = kind == "relu" or getattr(act, "act", None) is torch.nn.functional.gelu
    if kind is None or not exact:
        _refuse_block(family, f"dense_act_fn={_act_names(act)} ({type(act).__name__})",
                      "moe_lib's Switch experts are 'relu' or 'gelu' (F.gelu, exact erf)")
    return kind


def _read_switch_transformers(block: nn.Module, options: _Options) -> dict:
    """Top-1 on softmax(classifier(x)) computed at ``router_dtype``, the raw probability as
    weight; ``expert_capacity`` slots per expert and sequence (HF's cumsum runs over the
    sequence dimension), the first tokens of a sequence first; ReLU/GELU experts."""
    router, family = block.router, options.family
    E, H = router.classifier.weight.shape
    experts = [block.experts[f"expert_{i}"] for i in range(E)]
    if router.dtype not in (torch.float32, torch.float64):
        _refuse_block(family, f"router_dtype={str(router.dtype).removeprefix('torch.')!r}",
                      "moe_lib's routers compute in float32 at least (a narrower router can "
                      "flip choices)")
    kinds = {_switch_activation(e.act, family) for e in experts}
    p = max(e.dropout.p for e in experts)
    if p > 0 and not options.drop_expert_dropout:
        _refuse_block(family, f"dropout_rate={p}",
                      "dropout inside the experts is a training-time behaviour moe_lib's experts "
                      "do not have; pass drop_expert_dropout=True to build the layer without it")
    capacity = router.expert_capacity
    if not isinstance(capacity, int) or capacity < 1:
        _refuse_block(family, f"expert_capacity={capacity!r}", "moe_lib needs whole slots >= 1")
    return dict(d_model=H, d_hidden=experts[0].wi.out_features, num_experts=E, top_k=1,
                expert=kinds.pop(), weighting="raw", router_bias=router.classifier.bias is not None,
                capacity=capacity, capacity_per="sequence",
                jitter_eps=_jitter(router.jitter_noise, options,
                                   "when router_dtype is the input's dtype"))


def _read_gpt_oss(block: nn.Module, options: _Options) -> dict:
    """Logits with a bias, top-k on the logits, softmax over the k; clamped SwiGLU experts with
    biases (``swiglu_alpha``, ``swiglu_limit``)."""
    router, experts = block.router, block.experts
    _check_eager(experts, options.family)
    E, H = router.weight.shape
    return dict(d_model=H, d_hidden=experts.intermediate_size, num_experts=E, top_k=router.top_k,
                expert="clamped_swiglu", expert_bias=True, swiglu_alpha=float(experts.alpha),
                swiglu_limit=float(experts.limit), router_bias=True, weighting="topk_softmax")


def family_of(block: object) -> str:
    """The family name of a Hugging Face MoE block (its exact class, not a subclass)."""
    check_type("block", block, nn.Module)
    cls = type(block)
    for name, family in FAMILIES.items():
        if cls.__name__ == family.block and cls.__module__ == _modeling(name):
            return name
    supported = ", ".join(f.block for f in FAMILIES.values())
    raise TypeError(f"block must be a Hugging Face MoE block ({supported}), got "
                    f"{cls.__module__}.{cls.__qualname__}")


def from_hf(block: nn.Module, *, jitter: str | None = None, drop_expert_dropout: bool = False,
            **options: object) -> MoE:
    """An :class:`MoE` with the weights, dtype and device of a Hugging Face MoE ``block``.

    The routing, experts, shared experts and capacity come from the block; ``options`` are the
    losses, which the blocks do not compute (their models do), and the dispatch: e.g.
    ``balance_loss="switch", balance_coef=config.router_aux_loss_coef`` for the Mixtral-style
    families and gpt-oss (Hugging Face's ``load_balancing_loss_func``; it pools the layers of a
    model, see :func:`moe_lib.losses.pooled_switch_loss`), ``balance_loss="switch_per_sequence"``
    and ``z_loss_coef=config.router_z_loss_coef`` for Switch Transformers.

    ``jitter``: for a block with ``router_jitter_noise > 0`` (Mixtral, Switch), refused by
    default: Hugging Face's jitter multiplies the hidden states in place, so it also reaches
    the experts' input (Mixtral; Switch when ``router_dtype`` equals the input's dtype).
    "router_only" builds moe_lib's jitter on the router's input; "off" builds none.
    ``drop_expert_dropout``: build a Switch block whose experts have dropout
    (``dropout_rate > 0``) without it.

    The dtype and device are those of the block's experts, except that a router tensor
    wider than them stays wide (a bf16 DeepSeek-V3 model keeps ``e_score_correction_bias`` in
    float32; Switch converts its router to ``router_dtype`` in the forward): a float64 block
    gives a float64 layer. The layer is in the block's training mode.
    """
    family = family_of(block)
    check_choice("jitter", jitter, JITTER)
    check_bool("drop_expert_dropout", drop_expert_dropout)
    unknown = sorted(set(options) - set(PASS_THROUGH))
    if unknown:
        raise TypeError(f"from_hf takes the layer's settings from the block; of MoE's options "
                        f"it accepts {', '.join(PASS_THROUGH)} only, got {', '.join(unknown)}")
    spec = FAMILIES[family]
    if jitter is not None and not spec.has_jitter:
        raise ValueError(f"jitter applies to blocks with router jitter (mixtral, "
                         f"switch_transformers), not to {family} blocks")
    if drop_expert_dropout and not spec.has_dropout:
        raise ValueError(f"drop_expert_dropout applies to switch_transformers blocks, not to "
                         f"{family} blocks")
    config = MoEConfig(**spec.read(block, _Options(family, jitter, drop_expert_dropout)),
                       **options)
    reference = next(block.experts.parameters())
    state = state_from_hf(family, block.state_dict())
    with torch.device(reference.device):
        layer = MoE.from_config(config)
    layer.to(reference.dtype)
    # A router tensor wider than the experts stays wide (a bf16 DeepSeek-V3 model keeps its
    # correction bias in float32; Switch's router runs at router_dtype): rounding it to the
    # experts' dtype could change choices.
    layer.router.to(_widest(state, "router.", reference.dtype))
    layer.load_state_dict(state)
    return layer.train(block.training)


def _widest(state: dict[str, Tensor], prefix: str, dtype: torch.dtype) -> torch.dtype:
    """The widest of ``dtype`` and the floating dtypes of the tensors named ``prefix...``."""
    for name, t in state.items():
        if name.startswith(prefix) and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# Writing blocks (to_hf)


def _refuse_layer(family: str, field: str, value: object, why: str) -> NoReturn:
    raise ValueError(f"to_hf({family!r}) cannot express {field}={value!r}: {why}")


def _check_common(c: MoEConfig, family: str, *, experts: tuple[str, ...] = ("swiglu",),
                  score: str = "softmax", router_bias: bool = False, expert_bias: bool = False,
                  deepseek: bool = False, capacity: bool = False, shared: str | None = None,
                  weightings: tuple[str, ...] = ("renormalize", "topk_softmax", "raw")) -> None:
    """Refuse every layer option the family's block cannot express.

    ``shared``: None (no shared experts), "gated" (Qwen2-MoE) or "ungated" (DeepSeek-V3).
    ``deepseek``: groups, selection bias and routed scaling factor allowed.
    """
    def refuse_if(bad: bool, field: str, why: str) -> None:
        if bad:
            _refuse_layer(family, field, getattr(c, field), why)

    refuse_if(c.router != "topk", "router", "the blocks route by top-k token choice")
    refuse_if(c.jitter_eps > 0, "jitter_eps", "Hugging Face's jitter multiplies the hidden "
              "states in place, so it also reaches the experts' input")
    refuse_if(c.expert not in experts, "expert", f"its experts are {' or '.join(experts)}")
    refuse_if(c.expert_bias and not expert_bias, "expert_bias", "its experts have no biases")
    refuse_if(c.router_bias and not router_bias, "router_bias", "its router has no bias")
    refuse_if(c.score != score, "score", f"its router scores with {score}")
    refuse_if(c.weighting not in weightings, "weighting",
              f"its gate weights are {' or '.join(weightings)}")
    for field, off in (("n_group", None), ("selection_bias", False),
                       ("routed_scaling_factor", 1.0)):
        refuse_if(getattr(c, field) != off and not deepseek, field, "DeepSeek-V3's option")
    if capacity:
        refuse_if(c.capacity is None, "capacity", "Switch drops past expert_capacity whole "
                  "slots per sequence: give capacity (not capacity_factor)")
        refuse_if(c.capacity_per != "sequence", "capacity_per", "Switch's capacity is per "
                  "sequence")
    else:
        refuse_if(c.capacity_factor is not None, "capacity_factor", "a dropless family")
        refuse_if(c.capacity is not None, "capacity", "a dropless family")
    refuse_if(c.n_shared > 0 and shared is None, "n_shared", "no shared experts in its block")
    refuse_if(c.n_shared == 0 and shared is not None, "n_shared",
              "its block always holds shared experts")
    refuse_if(c.n_shared > 0 and c.shared_gate != (shared == "gated"), "shared_gate",
              f"its shared experts are {shared}")


def _losses(c: MoEConfig, family: str, drop_losses: bool, balance: str | None,
            z_loss: bool) -> dict:
    """Config fields for the layer's losses, where the family's model computes the same one
    (``balance``: its balance loss; ``z_loss``: whether it has a z-loss); a loss it does not
    compute is refused unless ``drop_losses``."""
    out: dict = {}
    if c.balance_loss is not None and c.balance_loss == balance:
        out["router_aux_loss_coef"] = c.balance_coef
        out["output_router_logits"] = True
    elif c.balance_loss is not None and not drop_losses:
        _refuse_layer(family, "balance_loss", c.balance_loss,
                      f"its model computes {balance!r} (pass drop_losses=True to leave it out)")
    if c.z_loss_coef > 0 and z_loss:
        out["router_z_loss_coef"] = c.z_loss_coef
    elif c.z_loss_coef > 0 and not drop_losses:
        _refuse_layer(family, "z_loss_coef", c.z_loss_coef, "its model computes no z-loss "
                      "(pass drop_losses=True to leave it out)")
    return out


def _norm(c: MoEConfig) -> bool:
    """``norm_topk_prob``: "renormalize" and "topk_softmax" are the same weights for softmax."""
    return c.weighting != "raw"


def _write_mixtral(c: MoEConfig, drop_losses: bool) -> dict:
    _check_common(c, "mixtral", weightings=("renormalize", "topk_softmax"))
    return dict(hidden_size=c.d_model, intermediate_size=c.d_hidden,
                num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, hidden_act="silu",
                router_jitter_noise=0.0,
                **_losses(c, "mixtral", drop_losses, "switch", False))


def _write_qwen2_moe(c: MoEConfig, drop_losses: bool) -> dict:
    """Several shared experts of width d_shared are one shared expert of width n * d_shared."""
    _check_common(c, "qwen2_moe", shared="gated")
    return dict(hidden_size=c.d_model, moe_intermediate_size=c.d_hidden,
                shared_expert_intermediate_size=c.n_shared * c.d_shared,
                num_experts=c.num_experts, num_experts_per_tok=c.top_k, norm_topk_prob=_norm(c),
                hidden_act="silu", **_losses(c, "qwen2_moe", drop_losses, "switch", False))


def _write_qwen3_moe(c: MoEConfig, drop_losses: bool) -> dict:
    _check_common(c, "qwen3_moe")
    return dict(hidden_size=c.d_model, moe_intermediate_size=c.d_hidden,
                num_experts=c.num_experts, num_experts_per_tok=c.top_k, norm_topk_prob=_norm(c),
                hidden_act="silu", **_losses(c, "qwen3_moe", drop_losses, "switch", False))


def _write_olmoe(c: MoEConfig, drop_losses: bool) -> dict:
    _check_common(c, "olmoe")
    return dict(hidden_size=c.d_model, intermediate_size=c.d_hidden, num_experts=c.num_experts,
                num_experts_per_tok=c.top_k, norm_topk_prob=_norm(c), hidden_act="silu",
                **_losses(c, "olmoe", drop_losses, "switch", False))


def _write_deepseek_v3(c: MoEConfig, drop_losses: bool) -> dict:
    """No grouping is one group; no selection bias is a zero correction bias."""
    family = "deepseek_v3"
    _check_common(c, family, score="sigmoid", deepseek=True, shared="ungated",
                  weightings=("renormalize", "raw"))
    width = c.n_shared * c.d_shared
    if width % c.d_hidden:
        _refuse_layer(family, "d_shared", c.d_shared, f"its shared MLP is n_shared_experts "
                      f"experts of width moe_intermediate_size=d_hidden={c.d_hidden}")
    n_group = 1 if c.n_group is None else c.n_group
    if c.num_experts // n_group < 2:
        _refuse_layer(family, "n_group", c.n_group, "Hugging Face's router scores a group by "
                      "its top-2 experts: groups need two experts at least")
    return dict(hidden_size=c.d_model, moe_intermediate_size=c.d_hidden,
                n_routed_experts=c.num_experts, num_experts_per_tok=c.top_k,
                n_shared_experts=width // c.d_hidden, n_group=n_group,
                topk_group=1 if c.topk_group is None else c.topk_group,
                norm_topk_prob=_norm(c), routed_scaling_factor=c.routed_scaling_factor,
                hidden_act="silu", **_losses(c, family, drop_losses, None, False))


def _write_switch_transformers(c: MoEConfig, drop_losses: bool) -> dict:
    """Switch's model weighs its losses by router_aux_loss_coef and router_z_loss_coef (0 where
    the layer has none)."""
    family = "switch_transformers"
    if c.top_k != 1:
        _refuse_layer(family, "top_k", c.top_k, "Switch routes each token to one expert")
    _check_common(c, family, experts=("relu", "gelu"), router_bias=True, capacity=True,
                  weightings=("raw",))
    losses = _losses(c, family, drop_losses, "switch_per_sequence", True)
    losses.pop("output_router_logits", None)
    return dict(d_model=c.d_model, d_ff=c.d_hidden, num_experts=c.num_experts,
                expert_capacity=c.capacity, router_bias=c.router_bias, router_jitter_noise=0.0,
                dropout_rate=0.0, dense_act_fn=c.expert,
                **{"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0, **losses})


def _write_gpt_oss(c: MoEConfig, drop_losses: bool) -> dict:
    """No router or expert biases are zero biases."""
    _check_common(c, "gpt_oss", experts=("clamped_swiglu",), router_bias=True, expert_bias=True,
                  weightings=("topk_softmax", "renormalize"))
    return dict(hidden_size=c.d_model, intermediate_size=c.d_hidden,
                num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
                swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
                **_losses(c, "gpt_oss", drop_losses, "switch", False))


def _modeling(family: str) -> str:
    return f"transformers.models.{family}.modeling_{family}"


def _import(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"to_hf needs transformers: pip install \"moe_lib[hf]\" ({e})") from e


def to_hf(layer: MoE, family: str, *, drop_losses: bool = False) -> nn.Module:
    """The Hugging Face block of ``family`` with ``layer``'s weights, dtype, device and
    training mode, its config made from the layer's sizes.

    Options the family cannot express are refused, naming them (expert biases to Mixtral,
    shared experts to Qwen3-MoE, capacity to a dropless family, ...); where zeros express
    the layer (gpt-oss's biases, DeepSeek-V3's correction bias) they are zeros. The layer's
    balance loss and z-loss go into the config where the family's model computes the same
    loss (``router_aux_loss_coef``, ``router_z_loss_coef``); another is refused unless
    ``drop_losses``. Switch's router runs at ``router_dtype="float32"`` whatever the layer's
    dtype (its config allows no float64).
    """
    check_type("layer", layer, MoE)
    check_choice("family", family, tuple(FAMILIES))
    check_bool("drop_losses", drop_losses)
    spec = FAMILIES[family]
    fields = spec.write(layer.config, drop_losses)
    config_module = _import(f"transformers.models.{family}.configuration_{family}")
    config = getattr(config_module, spec.config)(**fields, experts_implementation="eager")
    reference = layer.experts.w_in
    with torch.device(reference.device):
        block = getattr(_import(_modeling(family)), spec.block)(config)
    block.to(reference.dtype)
    state = state_to_hf(family, layer.state_dict())
    for name in spec.keep_wide:  # as from_hf keeps them: a wide router tensor stays wide
        if name in state:
            path, _, attr = name.rpartition(".")
            t = getattr(block.get_submodule(path), attr)
            t.data = t.data.to(torch.promote_types(t.dtype, state[name].dtype))
    own = block.state_dict()
    for name in spec.zero_fill:
        state.setdefault(name, torch.zeros_like(own[name]))
    block.load_state_dict(state)
    return block.train(layer.training)


FAMILIES: dict[str, Family] = {
    "mixtral": Family("MixtralSparseMoeBlock", "MixtralConfig", _read_mixtral, _write_mixtral,
                      _stacked_rules, has_jitter=True),
    "qwen2_moe": Family("Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig", _read_qwen2_moe,
                        _write_qwen2_moe, _qwen2_moe_rules),
    "qwen3_moe": Family("Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig", _read_softmax_topk,
                        _write_qwen3_moe, _stacked_rules),
    "olmoe": Family("OlmoeSparseMoeBlock", "OlmoeConfig", _read_softmax_topk, _write_olmoe,
                    _stacked_rules),
    "deepseek_v3": Family("DeepseekV3MoE", "DeepseekV3Config", _read_deepseek_v3,
                          _write_deepseek_v3, _deepseek_v3_rules,
                          zero_fill=("gate.e_score_correction_bias",),
                          keep_wide=("gate.e_score_correction_bias",)),
    "switch_transformers": Family("SwitchTransformersSparseMLP", "SwitchTransformersConfig",
                                  _read_switch_transformers, _write_switch_transformers,
                                  _switch_rules,
                                  keep_wide=("router.classifier.weight", "router.classifier.bias"),
                                  has_jitter=True, has_dropout=True),
    "gpt_oss": Family("GptOssMLP", "GptOssConfig", _read_gpt_oss, _write_gpt_oss, _gpt_oss_rules,
                      zero_fill=("router.bias", "experts.gate_up_proj_bias",
                                 "experts.down_proj_bias")),
}
"""The supported families by name, as Hugging Face names them (``model_type``)."""
