"""Builders shared by the unit tests: routings, layers, expert weights, gradients.

Everything here uses moe_lib's public names only.
"""

from __future__ import annotations

import torch

from moe_lib import MoE, Permutation
from moe_lib.activations import activation, in_width
from moe_lib.routing import make_routing


def random_routing(T, E, k, seed=0, drop=None, dtype=torch.float32):
    """A top-k routing of T tokens with distinct experts per token; ``drop``: fraction of the
    copies marked dropped by capacity."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else (
        torch.zeros(0, k, dtype=torch.long))
    w = torch.rand(T, k, generator=g, dtype=dtype)
    r = make_routing(ids, w, torch.zeros(T, E, dtype=dtype))
    if drop:
        r = r.with_kept(torch.rand(T, k, generator=g) >= drop)
    return r


def routing_of(ids, E, weights=None):
    """A Routing with the given ``ids: [T, k]`` (weights 1 unless given, logits 0)."""
    ids = torch.as_tensor(ids)
    w = torch.ones(ids.shape) if weights is None else torch.as_tensor(weights)
    return make_routing(ids, w, torch.zeros(ids.shape[0], E))


def permutation_of(routing):
    return Permutation.from_routing(routing)


def tiny_layer(router="topk", dispatch="sorted", expert="swiglu"):
    """A float64 eval-mode layer: d_model 3, d_hidden 2, 3 experts, top-2 (for gradcheck)."""
    torch.manual_seed(0)
    top_k = None if router == "dense" else 2
    layer = MoE(3, 2, 3, top_k=top_k, router=router, dispatch=dispatch, expert=expert)
    return layer.double().eval()


def layer_pair(d=6, h=5, seed=0, **kwargs):
    """The same layer twice, with dispatch="loop" and dispatch="sorted" and equal weights."""
    torch.manual_seed(seed)
    loop = MoE(d, h, dispatch="loop", **kwargs)
    fast = MoE(d, h, dispatch="sorted", **kwargs)
    fast.load_state_dict(loop.state_dict())
    return loop, fast


def grads(module, x):
    """Gradient of every parameter (None -> 0), then of x."""
    out = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    return out + [x.grad]


def expert_weights(E, d, h, kind, dtype=torch.float64, seed=0):
    """Stacked ``w_in: [E, d, h_in]``, ``w_out: [E, h, d]`` that require gradients."""
    g = torch.Generator().manual_seed(seed)
    h_in = in_width(h, kind)
    w_in = torch.randn(E, d, h_in, generator=g, dtype=dtype).requires_grad_()
    w_out = torch.randn(E, h, d, generator=g, dtype=dtype).requires_grad_()
    return w_in, w_out


def unfused_experts(x, w_in, w_out, counts, kind):
    """The reference for the expert kernels: one matmul per expert slice, autograd throughout."""
    outs = [activation(rows @ w_in[e], kind) @ w_out[e] for e, rows in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, w_out.shape[-1])


def tiny_lm_settings(**overrides):
    """moe_lib.bench.moe_vs_dense.QUICK shrunk to a one-layer model that trains in a blink."""
    from dataclasses import replace

    from moe_lib.bench.moe_vs_dense import QUICK

    small = dict(d_model=16, n_layers=1, n_heads=2, h=8, seq_len=16, batch=4, steps=2,
                 max_bytes=20_000, eval_batches=2)
    return replace(QUICK, **{**small, **overrides})


def bench_impls(names=None, d=8, h=8, E=4, k=2, dtype=torch.float32, seed=0):
    """moe_lib.bench.impls.build_impls at a tiny size (all registered names by default)."""
    from moe_lib.bench.impls import IMPLS, build_impls

    return build_impls(d, h, E, k, "cpu", dtype, IMPLS if names is None else names, seed=seed)
