"""Expert networks (moe_lib.experts): one FFN, a bank of E, and their three forward paths."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from moe_lib import ExpertBank, FeedForward
from moe_lib.activations import ffn_params

FAST = settings(max_examples=30, deadline=None, database=None)
KINDS = ["relu", "gelu", "swiglu"]



def bank(kind: str, E: int = 3) -> ExpertBank:
    torch.manual_seed(0)
    return ExpertBank(E, 6, 5, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_bank_expert_equals_feedforward_with_its_weights(kind):
    b, x = bank(kind), torch.randn(7, 6)
    for e in range(b.num_experts):
        ffn = FeedForward(6, 5, kind)
        ffn.load_state_dict({"w_in": b.w_in[e], "w_out": b.w_out[e]})
        torch.testing.assert_close(b.forward_expert(e, x), ffn(x))


@pytest.mark.parametrize("kind", KINDS)
def test_feedforward_formula(kind):
    torch.manual_seed(0)
    ffn, x = FeedForward(6, 5, kind), torch.randn(4, 6)
    h = x @ ffn.w_in
    act = {"relu": F.relu, "gelu": F.gelu}.get(kind)
    hidden = act(h) if act else F.silu(h[:, :5]) * h[:, 5:]  # SwiGLU: [gate | up]
    torch.testing.assert_close(ffn(x), hidden @ ffn.w_out)


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
def test_ffn_params(kind, d, h):
    assert ffn_params(d, h, kind) == (3 if kind == "swiglu" else 2) * d * h
    assert ffn_params(d, h, kind) == sum(p.numel() for p in FeedForward(d, h, kind).parameters())
    total = sum(p.numel() for p in ExpertBank(4, d, h, kind).parameters())
    assert total == 4 * ffn_params(d, h, kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_weights_are_cast_to_the_input_dtype(dtype):
    b, x = bank("swiglu"), torch.randn(4, 6)
    assert b.forward_slices(x.to(dtype), [1, 0, 3]).dtype == dtype
    assert b.forward_all(x.to(dtype)).dtype == dtype
    assert FeedForward(6, 5)(x.to(dtype)).dtype == dtype
    assert b.w_in.dtype == torch.float32  # the stored weights are not changed


def test_forward_slices_backward_reaches_only_used_experts():
    b = bank("gelu")
    b.forward_slices(torch.randn(3, 6), [2, 0, 1]).sum().backward()
    used = b.w_in.grad.flatten(1).abs().sum(1) > 0
    assert used.tolist() == [True, False, True]


@pytest.mark.parametrize("make, name", [
    (lambda: ExpertBank(0, 6, 5), "num_experts"),
    (lambda: ExpertBank(2, 6, 0), "d_hidden"),
    (lambda: ExpertBank(2, 6, 5, "tanh"), "kind"),
    (lambda: FeedForward(6.0, 5), "d_model"),
    (lambda: FeedForward(6, 5, "swish"), "kind"),
])
def test_bad_arguments(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()
