"""moe_lib.activations: each expert kind's forward and hand-written backward, and the kind's spec.

The backward of every kind must equal autograd's gradient of the forward; for clamped_swiglu
(gpt-oss) that includes torch.clamp's rule: no gradient where a clamp is active, full gradient
on the bounds themselves.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_lib.activations import (
    EXPERT_KINDS,
    ExpertActivation,
    activation,
    activation_backward,
    activation_from_saved,
    activation_spec,
    ffn_params,
    in_width,
)

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.5, limit=1.0)  # a small limit: clamps often
SPECS = [*EXPERT_KINDS, CLAMPED]


def gpt_oss_act(h, alpha, limit):
    """transformers' GptOssExperts on ``h = [gate | up]`` (side by side), line by line."""
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def reference(h, spec):
    """The textbook formula of each kind, differentiated by autograd."""
    spec = activation_spec(spec)
    if spec.kind == "relu":
        return F.relu(h)
    if spec.kind == "gelu":
        return F.gelu(h)
    if spec.kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return gpt_oss_act(h, spec.alpha, spec.limit)


def first_projection(spec, n=7, d_hidden=5, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_in = in_width(d_hidden, spec)
    return scale * torch.randn(n, h_in, generator=g, dtype=torch.float64)


def test_spec_of_a_name_and_of_keywords():
    assert activation_spec("relu") == ExpertActivation("relu")
    assert activation_spec("clamped_swiglu") == ExpertActivation("clamped_swiglu", 1.702, 7.0)
    spec = activation_spec("clamped_swiglu", alpha=1.0, limit=5)
    assert (spec.alpha, spec.limit) == (1.0, 5.0) and isinstance(spec.limit, float)
    assert activation_spec(spec) is spec
    assert activation_spec(spec, limit=2.0) == ExpertActivation("clamped_swiglu", 1.0, 2.0)
    assert [activation_spec(k).gated for k in EXPERT_KINDS] == [False, False, True, True]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.limit = 3.0


@pytest.mark.parametrize("make, exc, word", [
    (lambda: ExpertActivation("clamped_swiglu", alpha=0.0), ValueError, "alpha"),
    (lambda: ExpertActivation("clamped_swiglu", limit=-1.0), ValueError, "limit"),
    (lambda: ExpertActivation("clamped_swiglu", limit=float("inf")), ValueError, "limit"),
    (lambda: ExpertActivation("clamped_swiglu", alpha=float("nan")), ValueError, "alpha"),
    (lambda: ExpertActivation("clamped_swiglu", alpha="1"), TypeError, "alpha"),
    (lambda: ExpertActivation("clamped_swiglu", limit=True), TypeError, "limit"),
    (lambda: ExpertActivation("swiglu", limit=3.0), ValueError, "clamped_swiglu' only"),
    (lambda: activation_spec("relu", alpha=2.0), ValueError, "clamped_swiglu' only"),
    (lambda: activation_spec("clamped", limit=2.0), ValueError, "kind"),
    (lambda: activation_spec(None), ValueError, "kind"),
])
def test_bad_specs_are_refused(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_widths_and_parameter_counts(kind):
    gated = activation_spec(kind).gated
    assert in_width(6, kind) == (12 if gated else 6)
    assert ffn_params(4, 6, kind) == (3 if gated else 2) * 4 * 6
    assert ffn_params(4, 6, kind, bias=True) == ffn_params(4, 6, kind) + in_width(6, kind) + 4


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_forward_equals_the_formula(kind):
    h = first_projection(kind)
    torch.testing.assert_close(activation(h, kind), reference(h, kind), rtol=0, atol=0)


def test_clamped_swiglu_equals_gpt_oss_with_its_constants():
    h = first_projection("clamped_swiglu", n=50, scale=6.0)  # many values beyond +-7
    gate, up = h.chunk(2, dim=-1)
    assert (gate > 7).any() and (up > 7).any() and (up < -7).any()
    torch.testing.assert_close(activation(h, "clamped_swiglu"), gpt_oss_act(h, 1.702, 7.0),
                               rtol=0, atol=0)


def test_clamped_swiglu_ignores_values_past_the_clamps():
    h = first_projection(CLAMPED)
    gate, up = h.chunk(2, dim=-1)
    pushed = torch.cat([torch.where(gate > 1, gate + 5, gate),
                        torch.where(up.abs() > 1, up * 3, up)], dim=-1)
    assert not torch.equal(pushed, h)
    torch.testing.assert_close(activation(pushed, CLAMPED), activation(h, CLAMPED))


def _autograd_grad(h, spec, g):
    h = h.detach().requires_grad_()
    (grad,) = torch.autograd.grad(reference(h, spec), h, g)
    return grad


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_backward_equals_autograd(kind):
    h = first_projection(kind)
    g = torch.randn(h.shape[0], h.shape[1] // (2 if activation_spec(kind).gated else 1),
                    dtype=h.dtype)
    torch.testing.assert_close(activation_backward(g, h, kind), _autograd_grad(h, kind, g))


def test_clamped_backward_on_the_bounds_and_past_them():
    """torch.clamp passes the gradient on the bound itself and stops it past the bound."""
    lim = CLAMPED.limit
    gate = torch.tensor([[-3.0, lim - 1e-3, lim, lim + 1e-3, 4.0, float("nan")]],
                        dtype=torch.float64)
    up = torch.tensor([[-4.0, -lim - 1e-3, lim, -lim, lim + 1e-3, 0.5]], dtype=torch.float64)
    h, g = torch.cat([gate, up], dim=-1), torch.ones(1, 6, dtype=torch.float64)
    got, want = activation_backward(g, h, CLAMPED), _autograd_grad(h, CLAMPED, g)
    torch.testing.assert_close(got, want, equal_nan=True)
    d_gate, d_up = got.chunk(2, dim=-1)
    assert d_gate[0, 3:].eq(0).tolist() == [True, True, True]  # past the limit, and NaN
    assert d_gate[0, 2] != 0  # on it
    assert d_up[0].eq(0).tolist() == [True, True, False, False, True, False]


@pytest.mark.parametrize("kind", ["swiglu", CLAMPED], ids=str)
def test_saved_gate_half_gives_the_same_values(kind):
    h = first_projection(kind)
    g = torch.randn(h.shape[0], h.shape[1] // 2, dtype=h.dtype)
    buf = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype)
    act = activation(h, kind, silu_gate_out=buf)
    torch.testing.assert_close(act, activation(h, kind), rtol=0, atol=0)
    gate = h.chunk(2, dim=-1)[0]
    if kind == "swiglu":
        torch.testing.assert_close(buf, F.silu(gate))
    else:
        clamped = gate.clamp(max=kind.limit)
        torch.testing.assert_close(buf, clamped * torch.sigmoid(kind.alpha * clamped))
    torch.testing.assert_close(activation_from_saved(h, buf, kind), act, rtol=0, atol=0)
    torch.testing.assert_close(activation_backward(g, h, kind, buf),
                               activation_backward(g, h, kind))


class _HandWritten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, spec):
        ctx.spec = spec
        ctx.save_for_backward(h)
        return activation(h, spec)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return activation_backward(grad, h, ctx.spec), None


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_gradcheck_float64(kind):
    h = first_projection(kind, n=4, d_hidden=3, seed=1)
    if activation_spec(kind).kind == "relu":
        h = torch.where(h.abs() < 1e-3, 0.5, h)  # away from the kink
    if kind is CLAMPED:  # some values past the clamps, none within the step of a bound
        h = torch.where((h.abs() - CLAMPED.limit).abs() < 1e-2, 0.3, h)
        assert (h.abs() > CLAMPED.limit).any()
    assert torch.autograd.gradcheck(lambda t: _HandWritten.apply(t, kind),
                                    (h.requires_grad_(),))


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_bfloat16_keeps_its_dtype(kind):
    h = first_projection(kind).bfloat16()
    act = activation(h, kind)
    grad = activation_backward(torch.ones_like(act), h, kind)
    assert act.dtype == grad.dtype == torch.bfloat16
    torch.testing.assert_close(act.double(), reference(h.double(), kind), rtol=2e-2, atol=2e-2)


def test_odd_width_is_refused_for_clamped_swiglu():
    with pytest.raises(ValueError, match="even"):
        activation(torch.randn(2, 5), "clamped_swiglu")
