"""Expert capacity and token dropping (moe_lib.capacity)."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from moe_lib import MoE, apply_capacity, expert_capacity
from moe_lib.routing import make_routing

FAST = settings(max_examples=40, deadline=None, database=None)

FACTORS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0]


@st.composite
def routings(draw):
    """A top-k style routing (k distinct experts per token, skewed to provoke drops) and a cf."""
    T, E = draw(st.integers(0, 12)), draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    skew = torch.linspace(2.0, 0.0, E) * draw(st.floats(0.0, 3.0))  # favour low expert ids
    z = torch.randn(T, E, generator=g) + skew
    ids = z.topk(k, dim=-1).indices
    return make_routing(ids, torch.rand(T, k, generator=g), z), draw(st.sampled_from(FACTORS))


def reference_kept(ids: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """Brute force: slot-major (all first choices, then second ...), earlier tokens first."""
    T, k = ids.shape
    used = [0] * num_experts
    kept = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(ids[t, j])
            if used[e] < capacity:
                used[e] += 1
                kept[t, j] = True
    return kept


@pytest.mark.parametrize(
    "cf, T, k, E, C", [(1.0, 8, 2, 4, 4), (1.25, 8, 2, 4, 5), (0.1, 8, 1, 4, 1), (2.0, 3, 1, 8, 1),
                       (1.0, 0, 2, 4, 0), (1.5, 10, 3, 7, 7)]
)
def test_expert_capacity_formula(cf, T, k, E, C):
    assert expert_capacity(cf, T, k, E) == C == math.ceil(cf * T * k / E)


@pytest.mark.parametrize("cf", [0, -1.0, float("inf"), float("nan")])
def test_expert_capacity_rejects_bad_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(cf, 4, 1, 2)


@FAST
@given(routings())
def test_capacity_matches_brute_force(case):
    routing, cf = case
    T, k = routing.expert_ids.shape
    E = routing.num_experts
    C = expert_capacity(cf, T, k, E)
    out = apply_capacity(routing, cf)
    assert torch.equal(out.kept, reference_kept(routing.expert_ids, C, E))
    assert (out.tokens_per_expert <= C).all()
    assert out.tokens_per_expert.sum() + out.dropped == T * k
    assert out.dropped == int((~reference_kept(routing.expert_ids, C, E)).sum())
    kept_ids = routing.expert_ids[out.kept]
    assert torch.equal(out.tokens_per_expert, torch.bincount(kept_ids, minlength=E))
    # capacity changes the mask only, never the router's decision
    assert torch.equal(out.expert_ids, routing.expert_ids)
    assert torch.equal(out.weights, routing.weights)


@FAST
@given(routings())
def test_first_choices_are_served_before_second_choices(case):
    routing, cf = case
    out = apply_capacity(routing, cf)
    ids, kept = routing.expert_ids, out.kept
    T, k = ids.shape
    for e in range(routing.num_experts):
        # queue of expert e in priority order: (slot, token) ascending
        queue = [bool(kept[t, j]) for j in range(k) for t in range(T) if ids[t, j] == e]
        assert queue == sorted(queue, reverse=True)  # kept ones form a prefix of the queue


def test_capacity_known_example():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    r = apply_capacity(make_routing(ids, torch.ones(4, 2), torch.zeros(4, 3)), 0.75)  # C = 2
    # slot 0: tokens 0, 1 fill expert 0, token 2 is dropped, token 3 takes expert 1;
    # slot 1: token 0 fills expert 1, so token 1 is dropped; token 3's second choice (0) is full
    assert r.kept.tolist() == [[True, True], [True, False], [False, True], [True, False]]
    assert r.tokens_per_expert.tolist() == [2, 2, 1] and r.dropped == 3


def test_none_is_dropless():
    routing = make_routing(torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), torch.zeros(5, 3))
    assert apply_capacity(routing, None) is routing
    torch.manual_seed(0)
    out = MoE(8, 4, 4, top_k=2, capacity_factor=None)(torch.randn(64, 8))
    assert out.routing.dropped == 0 and out.routing.kept.all()
    assert out.routing.tokens_per_expert.sum() == 128


def manual_moe(layer, x, routing):
    """y_t = sum_j kept_tj * w_tj * E_{e_tj}(x_t), one token and one slot at a time."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.top_k):
            if routing.kept[t, j]:
                e = int(routing.expert_ids[t, j])
                y[t] += routing.weights[t, j] * layer.experts.forward_expert(e, x[t : t + 1])[0]
    return y


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
@pytest.mark.parametrize("router", ["topk", "dense"])
@pytest.mark.parametrize("cf", [0.25, 0.5, 1.0])
def test_layer_respects_capacity_and_dropped_contribute_nothing(dispatch, router, cf):
    torch.manual_seed(1)
    layer = MoE(6, 5, 4, top_k=None if router == "dense" else 2, router=router,
                capacity_factor=cf, dispatch=dispatch)
    with torch.no_grad():
        layer.router.gate.weight[0] += 2.0  # push tokens onto expert 0 so that some are dropped
    x = torch.randn(12, 6)
    out = layer(x)
    r = out.routing
    k = 4 if router == "dense" else 2
    C = math.ceil(cf * 12 * k / 4)
    assert (r.tokens_per_expert <= C).all()
    # dense routing sends every token to every expert: it drops exactly when cf < 1
    assert (r.dropped > 0) if (router == "topk" or cf < 1) else (r.dropped == 0)
    assert r.dropped == 12 * k - int(r.tokens_per_expert.sum())
    assert torch.equal(r.kept, reference_kept(r.expert_ids, C, 4))
    torch.testing.assert_close(out.y, manual_moe(layer, x, r), atol=1e-5, rtol=1e-5)
    fully_dropped = ~r.kept.any(dim=1)
    assert torch.equal(out.y[fully_dropped], torch.zeros_like(out.y[fully_dropped]))
