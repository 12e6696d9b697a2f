"""Expert networks (moe_lib.experts): one FFN, a bank of E, and their forward paths, with and
without biases; gpt-oss's experts (clamped SwiGLU with biases) against transformers' formula."""

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from moe_lib import ExpertBank, FeedForward
from moe_lib.activations import ExpertActivation, activation, ffn_params
from moe_lib.kernels import grouped_matmul

FAST = settings(max_examples=30, deadline=None, database=None)
KINDS = ["relu", "gelu", "swiglu", "clamped_swiglu"]
GATED = ("swiglu", "clamped_swiglu")
CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=1.5)  # clamps often


def bank(kind: str, E: int = 3, bias: bool = False) -> ExpertBank:
    torch.manual_seed(0)
    return ExpertBank(E, 6, 5, kind, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", [*KINDS, CLAMPED], ids=str)
def test_bank_expert_equals_feedforward_with_its_weights(kind, bias):
    b, x = bank(kind, bias=bias), 3 * torch.randn(7, 6)
    for e in range(b.num_experts):
        ffn = FeedForward(6, 5, kind, bias=bias)
        ffn.load_state_dict({name: p[e] for name, p in b.named_parameters()})
        torch.testing.assert_close(b.forward_expert(e, x), ffn(x))


@pytest.mark.parametrize("kind", KINDS)
def test_feedforward_formula(kind):
    torch.manual_seed(0)
    ffn, x = FeedForward(6, 5, kind), torch.randn(4, 6)
    h = x @ ffn.w_in
    gate, up = h[:, :5], h[:, 5:]  # gated kinds: [gate | up]
    clamped = gate.clamp(max=7.0)  # gpt-oss: limit 7, alpha 1.702
    hidden = {
        "relu": lambda: F.relu(h),
        "gelu": lambda: F.gelu(h),
        "swiglu": lambda: F.silu(gate) * up,
        "clamped_swiglu": lambda: (up.clamp(-7.0, 7.0) + 1) * clamped * torch.sigmoid(
            1.702 * clamped),
    }[kind]()
    torch.testing.assert_close(ffn(x), hidden @ ffn.w_out)


def test_feedforward_formula_with_biases():
    torch.manual_seed(0)
    ffn, x = FeedForward(6, 5, CLAMPED, bias=True), 3 * torch.randn(2, 4, 6)
    want = activation(x @ ffn.w_in + ffn.b_in, CLAMPED) @ ffn.w_out + ffn.b_out
    torch.testing.assert_close(ffn(x), want)
    assert ffn.kind == "clamped_swiglu" and ffn.activation == CLAMPED


@pytest.mark.parametrize("kind", KINDS)
def test_forward_all_stacks_every_expert(kind):
    b, x = bank(kind), torch.randn(5, 6)
    out = b.forward_all(x)
    assert out.shape == (3, 5, 6)
    for e in range(3):
        torch.testing.assert_close(out[e], b.forward_expert(e, x))


@FAST
@given(st.sampled_from(KINDS), st.lists(st.integers(0, 4), min_size=1, max_size=5))
def test_forward_slices_runs_each_expert_on_its_slice(kind, counts):
    b = bank(kind, E=len(counts))
    x = torch.randn(sum(counts), 6)
    out = b.forward_slices(x, counts)
    assert out.shape == x.shape
    parts = [b.forward_expert(e, rows) for e, rows in enumerate(x.split(counts))]
    torch.testing.assert_close(out, torch.cat(parts))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d, h", [(6, 5), (64, 128), (1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_ffn_params(kind, d, h, bias):
    h_in = 2 * h if kind in GATED else h
    assert ffn_params(d, h, kind, bias) == (3 if kind in GATED else 2) * d * h + bias * (h_in + d)
    ffn = FeedForward(d, h, kind, bias=bias)
    assert ffn_params(d, h, kind, bias) == sum(p.numel() for p in ffn.parameters())
    b = ExpertBank(4, d, h, kind, bias=bias)
    assert sum(p.numel() for p in b.parameters()) == 4 * ffn_params(d, h, kind, bias)
    assert b.params_per_expert() == ffn_params(d, h, kind, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind, bias", [("swiglu", False), ("clamped_swiglu", True)])
def test_weights_are_cast_to_the_input_dtype(dtype, kind, bias):
    b, x = bank(kind, bias=bias), torch.randn(4, 6)
    assert b.forward_slices(x.to(dtype), [1, 0, 3]).dtype == dtype
    assert b.forward_all(x.to(dtype)).dtype == dtype
    assert b.forward_expert(1, x.to(dtype)).dtype == dtype
    assert FeedForward(6, 5, kind, bias=bias)(x.to(dtype)).dtype == dtype
    assert b.w_in.dtype == torch.float32  # the stored weights are not changed
    if bias:
        assert b.b_in.dtype == torch.float32


def test_biases_exist_only_when_asked_for():
    torch.manual_seed(0)
    plain = ExpertBank(3, 6, 5)
    torch.manual_seed(0)
    biased = ExpertBank(3, 6, 5, bias=True)
    assert sorted(plain.state_dict()) == ["w_in", "w_out"]  # as before biases existed
    assert plain.b_in is None and plain.b_out is None
    assert sorted(biased.state_dict()) == ["b_in", "b_out", "w_in", "w_out"]
    assert biased.b_in.shape == (3, 10) and biased.b_out.shape == (3, 6)
    assert torch.equal(plain.w_in, biased.w_in) and torch.equal(plain.w_out, biased.w_out)
    ffn = FeedForward(6, 5, "relu", bias=True)
    assert ffn.b_in.shape == (5,) and ffn.b_out.shape == (6,)
    assert sorted(FeedForward(6, 5).state_dict()) == ["w_in", "w_out"]


def test_biases_are_initialised_like_nn_linear():
    torch.manual_seed(0)
    b = ExpertBank(4, 64, 16, bias=True)
    for bias, fan_in in ((b.b_in, 64), (b.b_out, 16)):
        bound = 1 / math.sqrt(fan_in)
        assert bias.abs().max() <= bound and bias.abs().max() > 0.8 * bound


def _grouped_path(b, x, counts):
    """forward_slices' GPU / torch.compile branch, written out (it runs on a CPU too)."""
    h = grouped_matmul(x, b.w_in.to(x.dtype), counts, None if b.b_in is None else
                       b.b_in.to(x.dtype))
    act = activation(h, b.activation)
    return grouped_matmul(act, b.w_out.to(x.dtype), counts, None if b.b_out is None else
                          b.b_out.to(x.dtype))


def _paths(b, counts):
    """Each forward path of a bank as ``x: [n, d] -> [n, d]`` for rows sorted by expert."""

    def by_expert(x):
        return torch.cat([b.forward_expert(e, rows) for e, rows in enumerate(x.split(counts))])

    def all_then_pick(x):
        outs = b.forward_all(x)  # [E, n, d]
        rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        return outs[rows, torch.arange(x.shape[0])]

    return {"slices": lambda x: b.forward_slices(x, counts), "grouped": lambda x: _grouped_path(
        b, x, counts), "expert": by_expert, "all": all_then_pick}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", [*KINDS, CLAMPED], ids=str)
def test_every_path_gives_the_same_values_and_gradients(kind, bias, monkeypatch):
    counts = [4, 0, 3, 5]
    b = bank(kind, E=4, bias=bias).double()
    x = 3 * torch.randn(sum(counts), 6, dtype=torch.float64)
    g = torch.randn_like(x)
    results = {}
    for name, f in _paths(b, counts).items():
        xr = x.clone().requires_grad_()
        y = f(xr)
        results[name] = [y, *torch.autograd.grad(y, [xr, *b.parameters()], g)]
    with monkeypatch.context() as m:  # forward_slices' own grouped branch
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        xr = x.clone().requires_grad_()
        y = b.forward_slices(xr, counts)
        results["slices, compiled branch"] = [y, *torch.autograd.grad(y, [xr, *b.parameters()],
                                                                       g)]
    for name, got in results.items():
        for a, c in zip(got, results["expert"], strict=True):
            torch.testing.assert_close(a, c, msg=lambda m, name=name: f"{name}: {m}")


def gpt_oss_experts(x, counts, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                    alpha=1.702, limit=7.0):
    """transformers' ``GptOssExperts`` on rows sorted by expert, line by line (gate and up
    interleaved: gate in the even columns, up in the odd ones)."""
    outs = []
    for e, current_state in enumerate(x.split(counts)):
        gate_up = current_state @ gate_up_proj[e] + gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        glu = gate * torch.sigmoid(gate * alpha)
        gated_output = (up + 1) * glu
        outs.append(gated_output @ down_proj[e] + down_proj_bias[e])
    return torch.cat(outs)


def test_clamped_swiglu_bank_equals_gpt_oss_experts():
    """gpt-oss's weights, de-interleaved by a column permutation, in an ExpertBank."""
    E, H, inter, counts = 3, 8, 6, [5, 0, 7]
    g = torch.Generator().manual_seed(0)
    hf = {  # the shapes of GptOssExperts' parameters
        "gate_up_proj": torch.randn(E, H, 2 * inter, generator=g, dtype=torch.float64),
        "gate_up_proj_bias": torch.randn(E, 2 * inter, generator=g, dtype=torch.float64),
        "down_proj": torch.randn(E, inter, H, generator=g, dtype=torch.float64),
        "down_proj_bias": torch.randn(E, H, generator=g, dtype=torch.float64),
    }
    hf = {k: v.requires_grad_() for k, v in hf.items()}
    x = 3 * torch.randn(sum(counts), H, generator=g, dtype=torch.float64)
    with torch.no_grad():  # the clamps are active somewhere, on both sides of up
        gate_up = torch.cat([r @ hf["gate_up_proj"][e] for e, r in enumerate(x.split(counts))])
        assert (gate_up[:, ::2] > 7).any() and (gate_up[:, 1::2] > 7).any()
        assert (gate_up[:, 1::2] < -7).any() and (gate_up[:, ::2] < 7).any()
    perm = torch.cat([torch.arange(0, 2 * inter, 2), torch.arange(1, 2 * inter, 2)])  # [gate|up]
    b = ExpertBank(E, H, inter, "clamped_swiglu", bias=True).double()
    b.load_state_dict({"w_in": hf["gate_up_proj"][..., perm], "b_in": hf["gate_up_proj_bias"][
        :, perm], "w_out": hf["down_proj"], "b_out": hf["down_proj_bias"]})
    gy = torch.randn(sum(counts), H, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    want = gpt_oss_experts(xr, counts, **hf)
    want_grads = torch.autograd.grad(want, [xr, *hf.values()], gy)
    for name, f in _paths(b, counts).items():
        xr = x.clone().requires_grad_()
        got = f(xr)
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")
        gx, gw_in, gb_in, gw_out, gb_out = torch.autograd.grad(
            got, [xr, b.w_in, b.b_in, b.w_out, b.b_out], gy)
        for a, c in zip((gx, gw_in, gb_in, gw_out, gb_out), (
                want_grads[0], want_grads[1][..., perm], want_grads[2][:, perm], *want_grads[3:]),
                strict=True):
            torch.testing.assert_close(a, c, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("path", ["slices", "grouped", "expert", "all"])
@pytest.mark.parametrize("kind", ["clamped_swiglu", CLAMPED, "gelu"], ids=str)
def test_gradcheck_with_biases_on_every_path(kind, path):
    counts = [3, 0, 2]
    b = bank(kind, bias=True).double()
    x = (2 * torch.randn(sum(counts), 6, dtype=torch.float64)).requires_grad_()
    names = [name for name, _ in b.named_parameters()]

    class Path(torch.nn.Module):  # one path as a module, so functional_call can swap parameters
        def __init__(self):
            super().__init__()
            self.bank = b

        def forward(self, x):
            return _paths(self.bank, counts)[path](x)

    def fn(x, *ps):
        return torch.func.functional_call(Path(), {f"bank.{n}": p for n, p in zip(names, ps)},
                                          (x,))

    params = [p.detach().clone().requires_grad_() for p in b.parameters()]
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("make, name", [
    (lambda: ExpertBank(0, 6, 5), "num_experts"),
    (lambda: ExpertBank(2, 6, 0), "d_hidden"),
    (lambda: ExpertBank(2, 6, 5, "tanh"), "kind"),
    (lambda: FeedForward(6.0, 5), "d_model"),
    (lambda: FeedForward(6, 5, "swish"), "kind"),
    (lambda: FeedForward(6, 5, bias=1), "bias"),
    (lambda: ExpertBank(2, 6, 5, bias="yes"), "bias"),
    (lambda: ExpertBank(2, 6, 5, ExpertActivation("clamped_swiglu", limit=0.0)), "limit"),
])
def test_bad_arguments(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()
