"""The MoE layer's public contract: shapes, dtypes, argument checks, edge cases (moe_lib.layer)."""

import dataclasses
import itertools

import pytest
import torch

from moe_lib import MoE

D, H, E, K = 8, 12, 4, 2


def k_for(router):
    """top_k for a router: None for "dense" (it uses every expert), else K."""
    return None if router == "dense" else K


COMBOS = list(itertools.product(["relu", "gelu", "swiglu"], ["dense", "topk", "noisy_topk"],
                                ["loop", "sorted"]))


@pytest.mark.parametrize("expert, router, dispatch", COMBOS)
@pytest.mark.parametrize("shape", [(5, D), (2, 3, D), (D,)])
def test_shapes(expert, router, dispatch, shape):
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k=k_for(router), expert=expert, router=router, dispatch=dispatch)
    out = layer(torch.randn(shape))
    T = 1 if len(shape) == 1 else int(torch.tensor(shape[:-1]).prod())  # [d] is one token
    k = E if router == "dense" else K
    r = out.routing
    assert out.y.shape == shape and out.aux_loss.shape == ()
    assert r.expert_ids.shape == (T, k) and r.expert_ids.dtype == torch.int64
    assert r.weights.shape == (T, k) and r.probs.shape == (T, E) and r.kept.shape == (T, k)
    assert r.tokens_per_expert.shape == (E,) and r.tokens_per_expert.sum() == T * k
    assert r.dropped == 0 and torch.isfinite(out.y).all()


def test_vector_input_is_one_token():
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k=K)
    x = torch.randn(D)
    out = layer(x)
    assert out.y.shape == (D,) and out.routing.num_tokens == 1
    torch.testing.assert_close(out.y, layer(x[None]).y[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router, dispatch", [("dense", "sorted"), ("topk", "loop"),
                                              ("topk", "sorted"), ("noisy_topk", "sorted")])
def test_output_dtype_follows_input_and_router_is_at_least_float32(dtype, router, dispatch):
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k=k_for(router), router=router, dispatch=dispatch,
                balance_loss="switch",
                z_loss_coef=1e-3, capacity_factor=1.0).eval()  # eval: no router noise
    x = torch.randn(3, 5, D)
    out = layer(x.to(dtype))
    router_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.y.dtype == dtype and out.aux_loss.dtype == router_dtype
    assert out.routing.probs.dtype == out.routing.weights.dtype == router_dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-5}.get(dtype, 0.1)
    torch.testing.assert_close(out.y.float(), layer(x).y, atol=tol, rtol=tol)


@pytest.mark.parametrize("weighting", ["renormalize", "raw"])
def test_topk_with_k_equal_e_is_dense_gating(weighting):
    torch.manual_seed(0)
    topk = MoE(D, H, E, top_k=E, router="topk", weighting=weighting)
    dense = MoE(D, H, E, router="dense")
    assert topk.state_dict().keys() == dense.state_dict().keys()
    dense.load_state_dict(topk.state_dict())
    x = torch.randn(9, D)
    a, b = topk(x), dense(x)
    torch.testing.assert_close(a.y, b.y)
    torch.testing.assert_close(a.routing.gates(), b.routing.gates())
    torch.testing.assert_close(a.routing.probs, b.routing.probs)
    assert not torch.allclose(MoE(D, H, E, router="dense")(x).y, b.y)  # the weights matter


def test_dense_uses_every_expert_and_refuses_another_top_k():
    layer = MoE(D, H, E, router="dense")
    assert layer.top_k == E and layer(torch.randn(2, D)).routing.expert_ids.shape == (2, E)
    assert MoE(D, H, E, top_k=E, router="dense").top_k == E
    with pytest.raises(ValueError, match="top_k"):
        MoE(D, H, E, top_k=1, router="dense")


BAD_ARGS = [
    (dict(d_model=0), ValueError, "d_model"),
    (dict(d_model=8.0), TypeError, "d_model"),
    (dict(d_model=True), TypeError, "d_model"),
    (dict(d_hidden=-3), ValueError, "d_hidden"),
    (dict(d_hidden="12"), TypeError, "d_hidden"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(num_experts=4.0), TypeError, "num_experts"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=5), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("inf")), ValueError, "capacity_factor"),
    (dict(capacity_factor="1.0"), TypeError, "capacity_factor"),
    (dict(balance_loss="switch", balance_coef=-0.1), ValueError, "balance_coef"),
    (dict(z_loss_coef=-1e-3), ValueError, "z_loss_coef"),
    (dict(z_loss_coef=float("nan")), ValueError, "z_loss_coef"),
    (dict(jitter_eps=-0.1), ValueError, "jitter_eps"),
    (dict(router="noisy_topk", jitter_eps=0.1), ValueError, "jitter_eps"),
    (dict(router="noisy_topk", noise_scale=-1.0), ValueError, "noise_scale"),
    (dict(expert="silu"), ValueError, "expert"),
    (dict(router="expert_choice"), ValueError, "router"),
    (dict(dispatch="grouped"), ValueError, "dispatch"),
    (dict(balance_loss="z"), ValueError, "balance_loss"),
    (dict(weighting="softmax"), ValueError, "weighting"),
]


@pytest.mark.parametrize("kwargs, exc, name", BAD_ARGS)
def test_constructor_errors_name_the_argument(kwargs, exc, name):
    args = dict(d_model=D, d_hidden=H, num_experts=E, top_k=K) | kwargs
    with pytest.raises(exc) as info:
        MoE(**args)
    assert name in str(info.value)


@pytest.mark.parametrize("x, exc, word", [
    (torch.randn(3, D + 1), ValueError, "d_model"),
    (torch.randn(D, 3), ValueError, "d_model"),
    (torch.tensor(1.0), ValueError, "d_model"),
    (torch.ones(3, D, dtype=torch.int64), TypeError, "dtype"),
    (torch.ones(3, D, dtype=torch.bool), TypeError, "dtype"),
    ([[0.0] * D], TypeError, "Tensor"),
])
def test_input_errors(x, exc, word):
    with pytest.raises(exc) as info:
        MoE(D, H, E, top_k=K)(x)
    assert word in str(info.value)


@pytest.mark.parametrize("router", ["dense", "topk", "noisy_topk"])
@pytest.mark.parametrize("dispatch", ["loop", "sorted", "dense"])
@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
@pytest.mark.filterwarnings("ignore:balance_loss='importance' without")  # not about the loss
def test_zero_tokens(router, dispatch, cf, shape):
    layer = MoE(D, H, E, top_k=k_for(router), router=router, dispatch=dispatch, capacity_factor=cf,
                balance_loss="importance", z_loss_coef=1e-3)
    out = layer(torch.randn(shape))
    assert out.y.shape == shape and out.aux_loss.item() == 0.0
    assert out.routing.dropped == 0 and out.routing.tokens_per_expert.tolist() == [0] * E


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router, balance", [("topk", "switch"), ("noisy_topk", "importance"),
                                             ("dense", "switch")])
def test_large_activations_stay_finite(dtype, router, balance):
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k=k_for(router), router=router, capacity_factor=1.0,
                balance_loss=balance,
                z_loss_coef=1e-3).train()
    x = (torch.randn(16, D) * 1e4).to(dtype).requires_grad_()
    out = layer(x)
    assert torch.isfinite(out.y).all() and torch.isfinite(out.aux_loss)
    (out.y.float().sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_parameters_get_gradients_from_y_and_aux_loss():
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k=K, balance_loss="switch", z_loss_coef=1e-3)
    out = layer(torch.randn(32, D))
    out.aux_loss.backward(retain_graph=True)
    assert layer.router.gate.weight.grad.abs().sum() > 0  # losses train the router
    out.y.sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in layer.experts.parameters())


@pytest.mark.parametrize("router", ["dense", "topk", "noisy_topk"])
@pytest.mark.parametrize("dispatch", ["loop", "sorted", "dense"])
def test_router_stays_float32_under_autocast(router, dispatch):
    """Inside torch.autocast(bfloat16) the router's maths stays float32 and gives the routing of
    the same layer without autocast; the experts run in bfloat16."""
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k=k_for(router), router=router, dispatch=dispatch,
                balance_loss="switch", z_loss_coef=1e-3).train()
    x = torch.randn(32, D)
    torch.manual_seed(1)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)  # the same noise for the noisy router
        out = layer(x)
    r = out.routing
    assert r.logits.dtype == r.probs.dtype == r.weights.dtype == torch.float32
    assert out.aux_loss.dtype == torch.float32
    torch.testing.assert_close(r.logits, ref.routing.logits)
    assert torch.equal(r.expert_ids, ref.routing.expert_ids)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert out.y.dtype == torch.float32  # the input's dtype
    torch.testing.assert_close(out.y, ref.y, atol=0.05, rtol=0.05)  # bfloat16 experts
    assert not torch.equal(out.y, ref.y)


def test_second_derivatives_loop_works_sorted_refuses_clearly():
    """The loop dispatch is plain autograd: gradgradcheck passes. The sorted path's kernels are
    once-differentiable: a gradient with create_graph=True still works, and differentiating it
    again raises an error that says so (not an internal out= error)."""
    torch.manual_seed(0)
    loop = MoE(3, 2, 3, top_k=2, dispatch="loop", expert="gelu").double().eval()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: loop(t).y, (x,))

    fast = MoE(3, 2, 3, top_k=2, dispatch="sorted", expert="gelu").double().eval()
    fast.load_state_dict(loop.state_dict())
    (g_fast,) = torch.autograd.grad(fast(x).y.pow(2).sum(), x, create_graph=True)
    (g_loop,) = torch.autograd.grad(loop(x).y.pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(g_fast, g_loop)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g_fast.sum().backward()


def test_config_round_trips_and_is_frozen():
    layer = MoE(D, H, E, top_k=1, router="topk", balance_loss="switch", capacity_factor=1.25)
    c = layer.config
    assert (c.weighting, c.balance_coef, c.dispatch, c.noise_scale) == ("raw", 1e-2, "sorted",
                                                                        None)
    assert MoE.from_config(c).config == c == MoE(**c.to_dict()).config
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 2
    layer.capacity_factor = 2.0  # a new, checked config; same weights
    assert layer.config.capacity_factor == 2.0 and layer.config.top_k == 1


def test_parameter_counts():
    for router in ("dense", "topk", "noisy_topk"):
        layer = MoE(D, H, E, top_k=k_for(router), router=router, expert="swiglu")
        counts = layer.parameter_counts()
        router_params = sum(p.numel() for p in layer.router.parameters())
        assert counts.total == sum(p.numel() for p in layer.parameters())
        assert counts.active == router_params + layer.top_k * 3 * D * H


def test_importance_loss_without_noise_warns():
    with pytest.warns(UserWarning, match="no gradient"):
        MoE(D, H, E, top_k=K, router="topk", balance_loss="importance")
