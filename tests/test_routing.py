"""Routers, top-k weighting and the Routing record (moe_lib.routing)."""

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from moe_lib import MoE, NoisyTopKRouter, TopKRouter
from moe_lib.routers import DenseRouter
from moe_lib.routing import make_routing, topk_weights

FAST = settings(max_examples=40, deadline=None, database=None)



@st.composite
def logits_and_k(draw):
    """Router logits ``[T, E]`` (float32, ties included) and a k in [1, E]."""
    T, E = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    z = draw(arrays(np.float32, (T, E), elements=st.floats(-30, 30, width=32)))
    return torch.from_numpy(z), draw(st.integers(1, E))


def reference_probs(z: torch.Tensor) -> torch.Tensor:
    """Softmax in float64 numpy, independent of torch.softmax."""
    a = z.double().numpy()
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return torch.from_numpy(e / e.sum(axis=1, keepdims=True))


@FAST
@given(logits_and_k())
def test_topk_ids_are_the_k_most_probable(case):
    z, k = case
    ids, _ = topk_weights(z, k, "renormalize")
    p = reference_probs(z)
    assert ids.dtype == torch.int64 and ids.shape == (z.shape[0], k)
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts per token
    chosen = p.gather(1, ids)  # [T, k]
    others = p.masked_fill(F.one_hot(ids, z.shape[1]).sum(1).bool(), -1.0)  # [T, E]
    assert (chosen.min(dim=1).values >= others.max(dim=1).values - 1e-12).all()
    assert torch.equal(chosen[:, 0], p.max(dim=1).values)  # slot 0 is the first choice


@FAST
@given(logits_and_k())
def test_weightings(case):
    z, k = case
    ids, renorm = topk_weights(z, k, "renormalize")
    ids_s, soft = topk_weights(z, k, "topk_softmax")
    ids_r, raw = topk_weights(z, k, "raw")
    assert torch.equal(ids, ids_s) and torch.equal(ids, ids_r)
    assert renorm.dtype == soft.dtype == raw.dtype == torch.float32
    ones = torch.ones(z.shape[0])
    torch.testing.assert_close(renorm.sum(1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(soft.sum(1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(renorm, soft, atol=1e-6, rtol=1e-5)
    assert (raw.sum(1) <= 1 + 1e-5).all() and (raw >= 0).all()
    expected = reference_probs(z).gather(1, ids)
    torch.testing.assert_close(raw.double(), expected, atol=1e-6, rtol=1e-5)


def test_raw_weights_sum_below_one_when_k_below_e():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _, raw = topk_weights(z, 2, "raw")
    p = torch.tensor([2.0, 1.0, 0.0, -1.0]).exp()
    torch.testing.assert_close(raw[0], p[:2] / p.sum())
    assert raw.sum() < 0.95


@pytest.mark.parametrize("weighting", ["renormalize", "topk_softmax", "raw"])
def test_layer_uses_the_weighting(weighting):
    torch.manual_seed(0)
    layer = MoE(8, 4, 5, top_k=2, weighting=weighting)
    r = layer(torch.randn(7, 8)).routing
    expected = topk_weights(r.logits, 2, weighting)[1]
    torch.testing.assert_close(r.weights, expected)
    torch.testing.assert_close(r.probs, r.logits.softmax(-1))
    if weighting == "raw":
        torch.testing.assert_close(r.weights, r.probs.gather(1, r.expert_ids))


def test_make_routing_keeps_everything():
    ids = torch.tensor([[0, 2], [2, 1], [2, 0]])
    z = torch.randn(3, 4)
    r = make_routing(ids, torch.rand(3, 2), z)
    assert r.kept.all() and r.dropped == 0
    assert r.tokens_per_expert.tolist() == [2, 1, 3, 0]
    assert (r.num_tokens, r.top_k, r.num_experts) == (3, 2, 4)
    torch.testing.assert_close(r.probs, z.softmax(-1))
    assert r.noisy_logits is None and r.noise_std is None


def test_gates_scatter_weights_and_zero_dropped():
    ids = torch.tensor([[1, 0], [2, 1]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    r = make_routing(ids, w, torch.zeros(2, 3))
    g = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.4, 0.6]])
    torch.testing.assert_close(r.gates(), g)
    r = r.with_kept(torch.tensor([[True, False], [False, True]]))
    assert r.tokens_per_expert.tolist() == [0, 2, 0] and r.dropped == 2
    torch.testing.assert_close(r.gates(kept_only=True), torch.tensor([[0, 0.7, 0], [0, 0.4, 0]]))
    torch.testing.assert_close(r.gates(), g)  # the router's weights are not changed


def test_dense_router_uses_every_expert():
    torch.manual_seed(0)
    router = DenseRouter(6, 4)
    x = torch.randn(5, 6)
    r = router(x)
    assert r.expert_ids.tolist() == [[0, 1, 2, 3]] * 5
    torch.testing.assert_close(r.weights, (x @ router.gate.weight.T).softmax(-1))
    assert r.tokens_per_expert.tolist() == [5] * 4


def noisy_pair(noise_scale=1.0):
    """A noisy router with a non-zero W_noise and a clean top-k router with the same W_g."""
    torch.manual_seed(0)
    noisy = NoisyTopKRouter(6, 5, top_k=2, noise_scale=noise_scale)
    torch.nn.init.normal_(noisy.noise.weight, std=0.5)
    clean = TopKRouter(6, 5, top_k=2, weighting="topk_softmax")
    clean.gate.weight.data.copy_(noisy.gate.weight)
    return noisy, clean, torch.randn(32, 6)


def test_noisy_router_eval_is_deterministic_and_clean():
    noisy, clean, x = noisy_pair()
    noisy.eval()
    a, b, c = noisy(x), noisy(x), clean(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.expert_ids, c.expert_ids)
    torch.testing.assert_close(a.weights, c.weights)
    assert a.noisy_logits is None and a.noise_std is None


def test_noisy_router_training_draws_fresh_noise():
    noisy, clean, x = noisy_pair()
    noisy.train()
    a, b = noisy(x), noisy(x)
    assert a.noisy_logits is not None and a.noise_std is not None
    assert a.noisy_logits.shape == a.noise_std.shape == (32, 5)
    assert not torch.equal(a.noisy_logits, b.noisy_logits)
    assert not torch.equal(a.weights, b.weights)
    assert not torch.equal(a.expert_ids, clean(x).expert_ids)
    # the record keeps the clean logits and probabilities; ids are the top-k of the noisy logits
    torch.testing.assert_close(a.logits, clean(x).logits)
    torch.testing.assert_close(a.probs, clean(x).probs)
    assert torch.equal(a.expert_ids, a.noisy_logits.topk(2, dim=-1).indices)
    expected_std = F.softplus(x @ noisy.noise.weight.T)
    torch.testing.assert_close(a.noise_std, expected_std)


def test_noise_std_at_init_is_softplus_zero_times_scale():
    torch.manual_seed(0)
    router = NoisyTopKRouter(4, 3, top_k=1, noise_scale=2.0).train()
    r = router(torch.randn(5, 4))
    torch.testing.assert_close(r.noise_std, torch.full((5, 3), 2 * float(np.log(2.0))))


def test_noise_scale_zero_turns_noise_off_in_training():
    noisy, clean, x = noisy_pair(noise_scale=0.0)
    a = noisy.train()(x)
    assert a.noisy_logits is None and a.noise_std is None
    assert torch.equal(a.expert_ids, clean(x).expert_ids)


def test_noisy_layer_eval_equals_clean_topk_layer():
    torch.manual_seed(0)
    noisy = MoE(8, 6, 4, top_k=2, router="noisy_topk").eval()
    clean = MoE(8, 6, 4, top_k=2, router="topk")
    missing = clean.load_state_dict(noisy.state_dict(), strict=False)
    assert missing.unexpected_keys == ["router.noise.weight"] and not missing.missing_keys
    x = torch.randn(10, 8)
    a, b = noisy(x), noisy(x)
    assert torch.equal(a.y, b.y)
    torch.testing.assert_close(a.y, clean(x).y)
    assert torch.equal(a.routing.expert_ids, clean(x).routing.expert_ids)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(6, 4, top_k=1, jitter_eps=0.5)
    x = torch.randn(16, 6)
    clean = x @ router.gate.weight.T
    torch.testing.assert_close(router.eval()(x).logits, clean)
    assert not torch.allclose(router.train()(x).logits, clean)
