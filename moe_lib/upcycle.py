"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE layer made from a trained dense FFN.

Every expert starts as a copy of the dense FFN, ``W_e = W_dense`` for e = 1..E; the router is
new (initialised at random, as in the paper). When the gate weights of a token sum to one
(``weighting="renormalize"`` or ``"topk_softmax"``) and no assignment is dropped, the layer
computes what the FFN computed:

    y = sum_{j in TopK(x)} g_j(x) FFN(x) = FFN(x)      (sum_j g_j(x) = 1).

Training then pulls the copies apart: each expert's gradient comes from the tokens routed to it.
``weighting="raw"`` (Switch) scales the output by the chosen probability instead, capacity
drops give zero for the dropped assignments, and shared experts add their output: such layers
start from a different function, which :func:`upcycle` allows (the paper's own layers use
capacity) and :func:`upcycled_equals_dense` measures.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import Tensor

from moe_lib.checks import check_int, check_positive_int, check_tensor, check_type
from moe_lib.experts import FeedForward
from moe_lib.layer import MoE
from moe_lib.models import Transformer

_FROM_FFN = ("d_model", "d_hidden", "expert", "expert_bias", "swiglu_alpha", "swiglu_limit")


def upcycle(ffn: FeedForward, num_experts: int, **options: object) -> MoE:
    """An :class:`MoE` of ``num_experts`` copies of ``ffn`` and a new router.

    ``ffn``: a dense :class:`~moe_lib.experts.FeedForward` (its width, kind and biases make
    the experts'); ``options``: the layer's other settings (``top_k``, ``weighting``,
    ``balance_loss`` ...; not those that come from the FFN). The layer has the FFN's dtype and
    device, and ``w_in[e] = ffn.w_in``, ``w_out[e] = ffn.w_out`` (and the biases) for every e.
    """
    check_type("ffn", ffn, FeedForward)
    check_positive_int("num_experts", num_experts)
    clash = sorted(set(options) & set(_FROM_FFN))
    if clash:
        raise ValueError(f"upcycle takes {clash} from the dense FFN; leave them out of options")
    spec = ffn.activation
    extra = ({"swiglu_alpha": spec.alpha, "swiglu_limit": spec.limit}
             if spec.kind == "clamped_swiglu" else {})
    d_hidden = ffn.w_out.shape[0]
    layer = MoE(ffn.d_model, d_hidden, num_experts, expert=spec.kind,
                expert_bias=ffn.b_in is not None, **extra, **options)
    layer.to(device=ffn.w_in.device, dtype=ffn.w_in.dtype)
    bank = layer.experts
    with torch.no_grad():
        bank.w_in.copy_(ffn.w_in.expand_as(bank.w_in))      # [E, d_model, h_in]
        bank.w_out.copy_(ffn.w_out.expand_as(bank.w_out))   # [E, d_hidden, d_model]
        if ffn.b_in is not None:
            bank.b_in.copy_(ffn.b_in.expand_as(bank.b_in))  # [E, h_in]
            bank.b_out.copy_(ffn.b_out.expand_as(bank.b_out))  # [E, d_model]
    return layer.train(ffn.training)


def upcycle_model(model: Transformer, num_experts: int, layers: list[int] | None = None,
                  **options: object) -> Transformer:
    """A copy of a dense :class:`~moe_lib.models.Transformer` whose FFN blocks ``layers``
    (default: all; the paper upcycles every other one) are :func:`upcycle`\\ d with
    ``options``. The original model is left as it is; attention, embeddings, norms and head
    are copied unchanged. The copy's ``cfg`` says ``ffn="moe"`` with the new layers' config
    when every block was upcycled, and keeps the dense config otherwise."""
    check_type("model", model, Transformer)
    check_positive_int("num_experts", num_experts)
    if model.cfg.ffn != "dense":
        raise ValueError(f"model must be a dense Transformer (cfg.ffn='dense'), got "
                         f"ffn={model.cfg.ffn!r}")
    n = len(model.blocks)
    if layers is None:
        layers = list(range(n))
    check_type("layers", layers, (list, tuple))
    for i in layers:
        check_int("layers[i]", i, low=0, high=n - 1)
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"layers must name distinct blocks, at least one, got {list(layers)}")
    out = copy.deepcopy(model)
    for i in layers:
        out.blocks[i].ffn = upcycle(out.blocks[i].ffn, num_experts, **options)
    if len(layers) == n:
        out.cfg = replace(model.cfg, ffn="moe", moe=out.blocks[layers[0]].ffn.config)
    return out


@torch.no_grad()
def upcycled_equals_dense(dense: Transformer, upcycled: Transformer, idx: Tensor) -> float:
    """The largest ``|logits(upcycled) - logits(dense)|`` on the token ids ``idx: [B, S]``, both
    models in eval mode (0 up to rounding when the upcycled layers start as the FFN)."""
    check_type("dense", dense, Transformer)
    check_type("upcycled", upcycled, Transformer)
    check_tensor("idx", idx, dims=2, kind="int")
    modes = dense.training, upcycled.training
    dense.eval()
    upcycled.eval()
    diff = (upcycled(idx).logits - dense(idx).logits).abs().max()
    dense.train(modes[0])
    upcycled.train(modes[1])
    return float(diff)
