"""Dispatch and combine (moe_lib.dispatch): loop and sorted agree, and the gradients are right."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn
from torch.func import functional_call

from moe_lib import MoE
from moe_lib.dispatch import DISPATCHERS
from moe_lib.permute import sort_by_expert
from moe_lib.routing import make_routing, topk_weights
from tests.helpers import grads, tiny_layer

FAST = settings(max_examples=30, deadline=None, database=None)


def manual_moe(layer, x, routing):
    """y_t = sum_j kept_tj * w_tj * E_{e_tj}(x_t), one token and one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for j in range(routing.top_k):
            if routing.kept[t, j]:
                e = int(routing.expert_ids[t, j])
                row = row + routing.weights[t, j] * layer.experts.forward_expert(e, x[t : t + 1])[0]
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros_like(x)


@st.composite
def layer_pairs(draw):
    E = draw(st.integers(1, 5))
    kwargs = dict(
        num_experts=E,
        top_k=draw(st.integers(1, E)),
        expert=draw(st.sampled_from(["relu", "gelu", "swiglu"])),
        router=draw(st.sampled_from(["topk", "noisy_topk"])),
        capacity_factor=draw(st.sampled_from([None, 0.1, 0.5, 1.0, 2.0])),
    )
    torch.manual_seed(draw(st.integers(0, 2**31)))
    loop = MoE(6, 5, dispatch="loop", **kwargs)
    fast = MoE(6, 5, dispatch="sorted", **kwargs)
    fast.load_state_dict(loop.state_dict())
    training = draw(st.booleans())
    return loop.train(training), fast.train(training), torch.randn(draw(st.integers(0, 10)), 6)


@FAST
@given(layer_pairs(), st.integers(0, 2**31))
def test_loop_and_sorted_agree_on_outputs_and_gradients(pair, seed):
    loop, fast, x = pair
    results = []
    for layer in (loop, fast):
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)  # the same router noise for both
        out = layer(xi)
        if x.shape[0] > 0:  # an empty batch has nothing to differentiate (see test below)
            (out.y * torch.linspace(-1, 1, out.y.numel()).view_as(out.y)).sum().backward()
        results.append((out, grads(layer, xi)))
    (a, ga), (b, gb) = results
    assert torch.equal(a.routing.expert_ids, b.routing.expert_ids)
    assert torch.equal(a.routing.kept, b.routing.kept)
    torch.testing.assert_close(a.y, b.y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.y, manual_moe(loop, x, a.routing), atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(ga, gb, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_zero_tokens_backward(dispatch):
    x = torch.zeros(0, 6, requires_grad=True)
    out = MoE(6, 5, 3, top_k=2, dispatch=dispatch)(x)
    assert out.y.requires_grad
    out.y.sum().backward()
    assert x.grad.shape == (0, 6)


def test_sort_by_expert_known_example():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])  # flattened: 2 0 0 1 2 1
    r = make_routing(ids, torch.ones(3, 2), torch.zeros(3, 3))
    r = r.with_kept(torch.tensor([[True, True], [False, True], [True, True]]))
    order, inverse, counts = sort_by_expert(r)
    assert counts == [1, 2, 2]
    assert order.tolist() == [1, 3, 5, 0, 4, 2]  # expert 0, then 1, then 2; dropped copy last
    assert torch.equal(order[inverse], torch.arange(6))


class Unfused(nn.Module):
    """The layer's pieces, put together by hand from the router weights and the dispatchers."""

    def __init__(self, layer: MoE, dispatch: str, weighting: str) -> None:
        super().__init__()
        self.layer, self.dispatch, self.weighting = layer, dispatch, weighting

    def forward(self, x):
        z = F.linear(x, self.layer.router.gate.weight)  # [T, E]
        ids, w = topk_weights(z, self.layer.top_k, self.weighting)
        routing = make_routing(ids, w, z)
        return DISPATCHERS[self.dispatch](x, routing, self.layer.experts)


def gradcheck_inputs(layer, prefix=""):
    torch.manual_seed(3)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    names = ["router.gate.weight", "experts.w_in", "experts.w_out"]
    params = dict(layer.named_parameters())
    tensors = [params[n].detach().clone().requires_grad_() for n in names]
    return [prefix + n for n in names], (x, *tensors)


@pytest.mark.parametrize("weighting, expert", [
    ("renormalize", "swiglu"), ("topk_softmax", "gelu"), ("raw", "relu")])
@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_gradcheck_pieces_float64(dispatch, weighting, expert):
    """Exact float64 gradcheck of router weights -> top-k -> dispatch -> experts -> combine."""
    module = Unfused(tiny_layer(dispatch=dispatch, expert=expert), dispatch, weighting)
    names, inputs = gradcheck_inputs(module.layer, "layer.")

    def f(x, *params):
        return functional_call(module, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("router, dispatch", [("topk", "loop"), ("topk", "sorted"),
                                              ("noisy_topk", "sorted"), ("dense", "sorted")])
def test_gradcheck_layer_float64(router, dispatch):
    """The real layer in float64 (its router too), at gradcheck's default tolerances."""
    layer = tiny_layer(router, dispatch)
    names, inputs = gradcheck_inputs(layer)

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,)).y

    assert torch.autograd.gradcheck(f, inputs)
