"""Each expert kind's non-linearity, forward and backward, written once.

An expert FFN is ``act(x @ w_in) @ w_out``. ``h = x @ w_in`` is the first projection:

- relu / gelu: ``h: [n, d_hidden] -> act: [n, d_hidden]``;
- swiglu (Shazeer 2020): ``h = [gate | up]: [n, 2 * d_hidden]`` (the two projections fused side
  by side) ``-> silu(gate) * up: [n, d_hidden]``.

:func:`activation` is the differentiable form (autograd records it); the kernels of
:mod:`moe_lib.kernels`, which write their own backward passes, use :func:`activation` with a
buffer for ``silu(gate)``, :func:`activation_from_saved` and :func:`activation_backward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lib.checks import check_choice, check_positive_int, check_tensor

EXPERT_KINDS = ("relu", "gelu", "swiglu")

_silu_out = torch.ops.aten.silu.out
_silu_backward = torch.ops.aten.silu_backward.grad_input
_gelu_backward = torch.ops.aten.gelu_backward.grad_input


def in_width(d_hidden: int, kind: str) -> int:
    """Width of the first projection: ``2 * d_hidden`` for SwiGLU (gate and up side by side)."""
    check_positive_int("d_hidden", d_hidden)
    check_choice("kind", kind, EXPERT_KINDS)
    return 2 * d_hidden if kind == "swiglu" else d_hidden


def ffn_params(d_model: int, d_hidden: int, kind: str) -> int:
    """Parameters of one expert (no biases): ``2 d h`` for ReLU/GELU, ``3 d h`` for SwiGLU."""
    check_positive_int("d_model", d_model)
    return d_model * in_width(d_hidden, kind) + d_hidden * d_model


def activation(h: Tensor, kind: str, silu_gate_out: Tensor | None = None) -> Tensor:
    """The non-linearity on the first projection ``h`` (shapes in the module docstring).

    ``silu_gate_out: [n, d_hidden]`` (SwiGLU only, no autograd): a buffer that receives
    ``silu(gate)``, which the kernels save for their backward pass.
    """
    check_tensor("h", h, kind="float")
    if kind == "relu":
        return F.relu(h)
    if kind == "gelu":
        return F.gelu(h)
    if kind != "swiglu":
        check_choice("kind", kind, EXPERT_KINDS)
    _check_swiglu_width(h)
    gate, up = h.chunk(2, dim=-1)
    if silu_gate_out is None:
        return F.silu(gate) * up
    _silu_out(gate, out=silu_gate_out)
    return silu_gate_out * up


def _check_swiglu_width(h: Tensor) -> None:
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"h must end in an even number of columns [gate | up] for kind='swiglu', "
                         f"got shape {tuple(h.shape)}")


def activation_from_saved(h: Tensor, silu_gate: Tensor | None, kind: str) -> Tensor:
    """The activation again from what a kernel saved: ``h`` (and ``silu(gate)`` for SwiGLU)."""
    check_tensor("h", h, kind="float")
    check_choice("kind", kind, EXPERT_KINDS)
    if kind == "swiglu":
        _check_swiglu_width(h)
        check_tensor("silu_gate", silu_gate, kind="float", shape=(*h.shape[:-1], h.shape[-1] // 2))
        return silu_gate * h.chunk(2, dim=-1)[1]
    return activation(h, kind)


def activation_backward(
    grad_act: Tensor, h: Tensor, kind: str, silu_gate: Tensor | None = None
) -> Tensor:
    """``d h`` from ``d act`` (the shapes of ``h`` and of the activation).

    - relu: ``d h = d act * [h > 0]``;
    - gelu: ``d h = d act * gelu'(h)``;
    - swiglu: ``d up = d act * silu(gate)``, ``d gate = d act * up * silu'(gate)``, both written
      into one ``[n, 2 * d_hidden]`` buffer (autograd's ``chunk`` backward would concatenate two
      halves: one more full pass). ``silu_gate``: ``silu(gate)`` if saved, else recomputed.
    """
    check_tensor("h", h, kind="float")
    check_tensor("grad_act", grad_act, kind="float", device=h.device)
    if kind == "relu":
        return grad_act * (h > 0)
    if kind == "gelu":
        return _gelu_backward(grad_act, h, grad_input=torch.empty_like(h))
    if kind != "swiglu":
        check_choice("kind", kind, EXPERT_KINDS)
    _check_swiglu_width(h)
    gate, up = h.chunk(2, dim=-1)
    if silu_gate is None:
        silu_gate = F.silu(gate)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)  # views: written in place
    torch.mul(grad_act, silu_gate, out=grad_up)
    torch.mul(grad_act, up, out=grad_gate)
    _silu_backward(grad_gate, gate, grad_input=grad_gate)
    return grad_h
