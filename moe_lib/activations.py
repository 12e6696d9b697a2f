"""Each expert kind's non-linearity, forward and backward, written once.

An expert FFN is ``act(x @ w_in + b_in) @ w_out + b_out`` (biases optional).
``h = x @ w_in + b_in`` is the first projection:

- relu / gelu: ``h: [n, d_hidden] -> act: [n, d_hidden]``;
- swiglu (Shazeer 2020): ``h = [gate | up]: [n, 2 * d_hidden]`` (the two projections fused side
  by side) ``-> silu(gate) * up: [n, d_hidden]``;
- clamped_swiglu (gpt-oss): ``h = [gate | up]: [n, 2 * d_hidden] -> (u + 1) * g * sigmoid(alpha
  g): [n, d_hidden]`` with ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``; alpha 1.702
  and limit 7.0 in gpt-oss. The checkpoints interleave gate and up columns; moe_lib keeps them side
  by side, so a loader permutes the columns.

A kind is named by a string, or by an :class:`ExpertActivation` that carries the parameters of
clamped_swiglu; every function here takes either (:func:`activation_spec`).

:func:`activation` is the differentiable form (autograd records it); the kernels of
:mod:`moe_lib.kernels`, which write their own backward passes, use :func:`activation` with a
buffer for the gate's half (``silu(gate)``, or ``g * sigmoid(alpha g)``),
:func:`activation_from_saved` and :func:`activation_backward`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lib.checks import (
    check_bool,
    check_choice,
    check_positive,
    check_positive_int,
    check_tensor,
)

EXPERT_KINDS = ("relu", "gelu", "swiglu", "clamped_swiglu")
GATED_KINDS = ("swiglu", "clamped_swiglu")
"""The kinds whose first projection is ``[gate | up]`` (``h_in = 2 * d_hidden``)."""

GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0

_silu_out = torch.ops.aten.silu.out
_silu_backward = torch.ops.aten.silu_backward.grad_input
_gelu_backward = torch.ops.aten.gelu_backward.grad_input


@dataclass(frozen=True)
class ExpertActivation:
    """An expert kind and its parameters: ``alpha`` and ``limit`` of clamped_swiglu (finite,
    > 0; the other kinds take none, so they keep the defaults)."""

    kind: str
    alpha: float = GPT_OSS_ALPHA
    limit: float = GPT_OSS_LIMIT

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, EXPERT_KINDS)
        check_positive("alpha", self.alpha)
        check_positive("limit", self.limit)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "limit", float(self.limit))
        if self.kind != "clamped_swiglu" and (self.alpha, self.limit) != (GPT_OSS_ALPHA,
                                                                          GPT_OSS_LIMIT):
            raise ValueError(f"alpha and limit apply to kind='clamped_swiglu' only, got "
                             f"kind={self.kind!r} with alpha={self.alpha}, limit={self.limit}")

    @property
    def gated(self) -> bool:
        """Whether ``h = [gate | up]`` (``h_in = 2 * d_hidden``)."""
        return self.kind in GATED_KINDS


_PLAIN = {k: ExpertActivation(k) for k in EXPERT_KINDS}  # no construction per call


def activation_spec(kind: str | ExpertActivation, *, alpha: float | None = None,
                    limit: float | None = None) -> ExpertActivation:
    """The :class:`ExpertActivation` of ``kind`` (a name or a spec), with ``alpha`` / ``limit``
    replaced where given: ``activation_spec("clamped_swiglu", limit=10.0)``."""
    if not isinstance(kind, ExpertActivation):
        check_choice("kind", kind, EXPERT_KINDS)
        kind = _PLAIN[kind]
    if alpha is None and limit is None:
        return kind
    return replace(kind, alpha=kind.alpha if alpha is None else alpha,
                   limit=kind.limit if limit is None else limit)


def in_width(d_hidden: int, kind: str | ExpertActivation) -> int:
    """Width of the first projection: ``2 * d_hidden`` for the gated kinds (gate and up side by
    side)."""
    check_positive_int("d_hidden", d_hidden)
    return 2 * d_hidden if activation_spec(kind).gated else d_hidden


def ffn_params(d_model: int, d_hidden: int, kind: str | ExpertActivation,
               bias: bool = False) -> int:
    """Parameters of one expert: ``d h_in + h d``, plus ``h_in + d`` with biases (``h_in = h``
    for ReLU/GELU, ``2 h`` for the gated kinds: ``2 d h`` or ``3 d h`` without biases)."""
    check_positive_int("d_model", d_model)
    h_in = in_width(d_hidden, kind)
    check_bool("bias", bias)
    return d_model * h_in + d_hidden * d_model + (h_in + d_model if bias else 0)


def activation(h: Tensor, kind: str | ExpertActivation,
               silu_gate_out: Tensor | None = None) -> Tensor:
    """The non-linearity on the first projection ``h`` (shapes and formulas in the module
    docstring).

    ``silu_gate_out: [n, d_hidden]`` (gated kinds only, no autograd): a buffer that receives the
    gate's half, ``silu(gate)`` or ``g * sigmoid(alpha g)``, which the kernels save for their
    backward pass.
    """
    check_tensor("h", h, kind="float")
    spec = activation_spec(kind)
    if spec.kind == "relu":
        return F.relu(h)
    if spec.kind == "gelu":
        return F.gelu(h)
    _check_gated_width(h, spec)
    gate, up = h.chunk(2, dim=-1)
    if spec.kind == "clamped_swiglu":
        return _clamped_swiglu(gate, up, spec, silu_gate_out)
    if silu_gate_out is None:
        return F.silu(gate) * up
    _silu_out(gate, out=silu_gate_out)
    return silu_gate_out * up


def _clamped_swiglu(gate: Tensor, up: Tensor, spec: ExpertActivation,
                    glu_out: Tensor | None) -> Tensor:
    """``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, limit)``: the
    operations of transformers' ``GptOssExperts``, in its order."""
    g = gate.clamp(max=spec.limit)
    if glu_out is None:
        glu = g * torch.sigmoid(g * spec.alpha)
        return (up.clamp(min=-spec.limit, max=spec.limit) + 1) * glu
    torch.mul(g, torch.sigmoid(g * spec.alpha), out=glu_out)
    return up.clamp(min=-spec.limit, max=spec.limit).add_(1).mul_(glu_out)


def _check_gated_width(h: Tensor, spec: ExpertActivation) -> None:
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"h must end in an even number of columns [gate | up] for "
                         f"kind={spec.kind!r}, got shape {tuple(h.shape)}")


def activation_from_saved(h: Tensor, silu_gate: Tensor | None,
                          kind: str | ExpertActivation) -> Tensor:
    """The activation again from what a kernel saved: ``h`` (and, for the gated kinds, the
    gate's half ``silu_gate: [n, d_hidden]`` that :func:`activation` wrote into its buffer)."""
    check_tensor("h", h, kind="float")
    spec = activation_spec(kind)
    if not spec.gated:
        return activation(h, spec)
    _check_gated_width(h, spec)
    check_tensor("silu_gate", silu_gate, kind="float", shape=(*h.shape[:-1], h.shape[-1] // 2))
    up = h.chunk(2, dim=-1)[1]
    if spec.kind == "clamped_swiglu":
        return (up.clamp(min=-spec.limit, max=spec.limit) + 1) * silu_gate
    return silu_gate * up


def activation_backward(
    grad_act: Tensor, h: Tensor, kind: str | ExpertActivation, silu_gate: Tensor | None = None
) -> Tensor:
    """``d h`` from ``d act`` (the shapes of ``h`` and of the activation).

    - relu: ``d h = d act * [h > 0]``;
    - gelu: ``d h = d act * gelu'(h)``;
    - swiglu: ``d up = d act * silu(gate)``, ``d gate = d act * up * silu'(gate)``;
    - clamped_swiglu: ``d up = d act * g sigmoid(alpha g) * [-limit <= up <= limit]``,
      ``d gate = d act * (u + 1) * s (1 + alpha g (1 - s)) * [gate <= limit]`` with
      ``s = sigmoid(alpha g)`` (zero where a clamp is active, as ``torch.clamp``'s gradient).

    Both halves of a gated ``d h`` are written into one ``[n, 2 * d_hidden]`` buffer (autograd's
    ``chunk`` backward would concatenate two halves: one more full pass). ``silu_gate``: the
    gate's half if saved, else recomputed.
    """
    check_tensor("h", h, kind="float")
    check_tensor("grad_act", grad_act, kind="float", device=h.device)
    spec = activation_spec(kind)
    if spec.kind == "relu":
        return grad_act * (h > 0)
    if spec.kind == "gelu":
        return _gelu_backward(grad_act, h, grad_input=torch.empty_like(h))
    _check_gated_width(h, spec)
    gate, up = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)  # views: written in place
    if spec.kind == "clamped_swiglu":
        _clamped_swiglu_backward(grad_act, gate, up, spec, silu_gate, grad_gate, grad_up)
        return grad_h
    if silu_gate is None:
        silu_gate = F.silu(gate)
    torch.mul(grad_act, silu_gate, out=grad_up)
    torch.mul(grad_act, up, out=grad_gate)
    _silu_backward(grad_gate, gate, grad_input=grad_gate)
    return grad_h


def _clamped_swiglu_backward(grad_act: Tensor, gate: Tensor, up: Tensor, spec: ExpertActivation,
                             glu: Tensor | None, grad_gate: Tensor, grad_up: Tensor) -> None:
    """Writes ``d gate`` and ``d up`` (formulas in :func:`activation_backward`) into the views."""
    g = gate.clamp(max=spec.limit)
    s = torch.sigmoid(g * spec.alpha)
    if glu is None:
        glu = g * s
    # torch.clamp's gradient: passed where lo <= x <= hi (a NaN x gets 0), else 0
    up_clamped = (up >= -spec.limit).logical_and_(up <= spec.limit).logical_not_()
    torch.mul(grad_act, glu, out=grad_up).masked_fill_(up_clamped, 0)
    d_swish = (1 - s).mul_(g).mul_(spec.alpha).add_(1).mul_(s)  # d/dg of g sigmoid(alpha g)
    u1 = up.clamp(min=-spec.limit, max=spec.limit).add_(1)
    torch.mul(grad_act, u1, out=grad_gate).mul_(d_swish)
    grad_gate.masked_fill_((gate <= spec.limit).logical_not_(), 0)
