"""Auxiliary losses (moe_lib.losses) and how the layer weights them into aux_loss."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from moe_lib import MoE, NoisyTopKRouter, apply_capacity, losses
from moe_lib.routing import make_routing

FAST = settings(max_examples=30, deadline=None, database=None)



def balanced_routing(T: int, E: int, k: int, logits: torch.Tensor | None = None):
    """Token t goes to experts t, t+1, ..., t+k-1 (mod E): every expert gets T*k/E assignments."""
    ids = (torch.arange(T)[:, None] + torch.arange(k)[None, :]) % E  # [T, k]
    z = torch.zeros(T, E) if logits is None else logits
    return make_routing(ids, torch.full((T, k), 1.0 / k), z)


@pytest.mark.parametrize("T, E, k", [(8, 4, 1), (8, 4, 2), (12, 6, 3), (5, 5, 5), (3, 1, 1)])
def test_switch_loss_is_k_under_uniform_routing(T, E, k):
    r = balanced_routing(T, E, k)
    assert r.tokens_per_expert.tolist() == [T * k // E] * E
    torch.testing.assert_close(losses.switch_loss(r), torch.tensor(float(k)))


def test_switch_loss_known_value_when_collapsed():
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).expand(6, 4)
    r = make_routing(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), z)
    p0 = math.exp(3) / (math.exp(3) + 3)
    torch.testing.assert_close(losses.switch_loss(r), torch.tensor(4 * p0))  # E * f_0 * P_0


def test_switch_loss_counts_choices_before_capacity():
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).expand(6, 4)
    r = make_routing(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), z)
    dropped = apply_capacity(r, 1.0)  # C = 2: four of the six assignments are dropped
    assert dropped.dropped == 4
    torch.testing.assert_close(losses.switch_loss(dropped), losses.switch_loss(r))


def test_z_loss_squares_before_the_mean():
    z = torch.stack([torch.zeros(4), torch.full((4,), 2.0)])  # logsumexp: ln 4, 2 + ln 4
    r = make_routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), z)
    expected = (math.log(4) ** 2 + (2 + math.log(4)) ** 2) / 2
    torch.testing.assert_close(losses.z_loss(r), torch.tensor(expected))


@pytest.mark.parametrize("E", [1, 2, 8, 64])
def test_z_loss_known_values(E):
    zero = balanced_routing(4, E, 1)  # all-zero logits: logsumexp = ln E
    torch.testing.assert_close(losses.z_loss(zero), torch.tensor(math.log(E) ** 2))
    z = torch.full((4, E), 2.0)
    torch.testing.assert_close(losses.z_loss(balanced_routing(4, E, 1, z)),
                               torch.tensor((2 + math.log(E)) ** 2))


def test_cv_squared_known_values_and_gradient_at_balance():
    v = torch.full((5,), 3.0, requires_grad=True)
    cv2 = losses.cv_squared(v)
    assert cv2.item() == 0.0
    cv2.backward()
    assert torch.isfinite(v.grad).all() and (v.grad == 0).all()
    torch.testing.assert_close(losses.cv_squared(torch.tensor([0.0, 2.0])), torch.tensor(1.0))
    assert losses.cv_squared(torch.tensor([7.0])).item() == 0.0


@FAST
@given(st.lists(st.floats(0.01, 100), min_size=2, max_size=10), st.floats(0.1, 10))
def test_cv_squared_is_scale_invariant_and_nonnegative(values, scale):
    v = torch.tensor(values, dtype=torch.float64)
    assert losses.cv_squared(v) >= 0
    torch.testing.assert_close(losses.cv_squared(v * scale), losses.cv_squared(v), rtol=1e-4,
                               atol=1e-6)


def test_importance_loss_known_value():
    r = make_routing(torch.tensor([[0], [0], [1]]), torch.tensor([[1.0], [0.5], [0.5]]),
                     torch.zeros(3, 2))
    torch.testing.assert_close(losses.importance(r), torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(losses.importance_loss(r), torch.tensor(0.25))  # var 0.25 / mean 1


@FAST
@given(st.integers(1, 16), st.integers(0, 2**31), st.booleans())
def test_importance_and_load_losses_nonnegative(T, seed, training):
    torch.manual_seed(seed)
    layer = MoE(6, 4, 4, top_k=2, router="noisy_topk", balance_loss="importance").train(training)
    out = layer(torch.randn(T, 6) * 3)
    assert out.losses["importance"] >= 0 and out.losses["load"] >= 0
    assert torch.isfinite(out.aux_loss)


def noisy_routing(seed: int, T: int = 6, E: int = 5, k: int = 2):
    torch.manual_seed(seed)
    router = NoisyTopKRouter(4, E, top_k=k).train()
    torch.nn.init.normal_(router.noise.weight, std=0.7)
    return router, torch.randn(T, 4)


def test_smooth_load_matches_monte_carlo():
    """P(x, i) = Pr(i stays in the top k when only its own noise is drawn again)."""
    router, x = noisy_routing(0)
    r = router(x)
    h, z, std = r.noisy_logits, r.logits, r.noise_std
    T, E, k, n = *h.shape, 2, 20000
    g = torch.Generator().manual_seed(0)
    estimate = torch.zeros(E)
    for i in range(E):
        others = torch.cat([h[:, :i], h[:, i + 1 :]], dim=1)  # [T, E-1]
        kth_excluding = others.topk(k, dim=1).values[:, -1]  # [T]
        redraw = z[:, i, None] + torch.randn(T, n, generator=g) * std[:, i, None]  # [T, n]
        estimate[i] = (redraw > kth_excluding[:, None]).float().mean(dim=1).sum()
    torch.testing.assert_close(losses.smooth_load(r), estimate, atol=0.03, rtol=0)


def test_smooth_load_sums_to_tokens_times_k_in_expectation():
    """E[P(x, i)] over the noise is Pr(i in the top k): summed over i it is k (not per draw)."""
    router, x = noisy_routing(1, T=8, E=6, k=2)
    draws = 5000  # the same 8 tokens 5000 times: one router call, fresh noise for every copy
    mean_sum = losses.smooth_load(router(x.repeat(draws, 1))).sum().item() / draws
    assert abs(mean_sum - 8 * 2) < 0.15  # about 5 standard errors
    assert abs(losses.smooth_load(router(x)).sum().item() - 8 * 2) > 1e-3  # not per draw


def test_smooth_load_has_gradient_in_training_and_counts_in_eval():
    router, x = noisy_routing(2)
    load = losses.smooth_load(router(x))
    load.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0 and router.noise.weight.grad.abs().sum() > 0
    r = router.eval()(x)
    assert torch.equal(losses.smooth_load(r), r.chosen_counts().float())
    assert losses.smooth_load(r).sum() == 6 * 2


@pytest.mark.parametrize("balance, coef", [("switch", None), ("switch", 0.5),
                                           ("importance", None), ("importance", 0.3)])
@pytest.mark.parametrize("z_coef", [0.0, 1e-3, 0.2])
def test_aux_loss_is_the_weighted_sum(balance, coef, z_coef):
    torch.manual_seed(0)
    layer = MoE(6, 4, 4, top_k=2, router="noisy_topk", balance_loss=balance, balance_coef=coef,
                z_loss_coef=z_coef)
    out = layer(torch.randn(16, 6))
    r = out.routing
    w = {"switch": 1e-2, "importance": 1e-1}[balance] if coef is None else coef
    if balance == "switch":
        balance_value = losses.switch_loss(r)
    else:
        balance_value = losses.importance_loss(r) + losses.load_loss(r)
    expected = w * balance_value + z_coef * losses.z_loss(r)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.shape == ()
    torch.testing.assert_close(out.aux_loss, expected)
    assert ("z" in out.losses) == (z_coef > 0)


@pytest.mark.parametrize("router", ["dense", "topk", "noisy_topk"])
def test_aux_loss_is_zero_without_losses(router):
    torch.manual_seed(0)
    out = MoE(6, 4, 4, router=router)(torch.randn(8, 6) * 10)
    assert out.aux_loss.item() == 0.0 and out.losses == {}
    with pytest.raises(ValueError, match="balance_coef"):  # a coefficient without a loss
        MoE(6, 4, 4, router=router, balance_coef=5.0)
