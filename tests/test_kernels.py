"""moe_lib.kernels.expert_mlp: the CPU path of ExpertBank.forward_slices.

It must give the values and gradients of the unfused path (two grouped GEMMs around the
activation, each differentiated by autograd or by its own backward), for every expert kind, with
empty experts, with experts split into several blocks, and when only some inputs need gradients.
"""

import pytest
import torch

from moe_lib import ExpertBank
from moe_lib.activations import activation
from moe_lib.kernels import BLOCK_BYTES, block_rows, expert_blocks, expert_mlp, grouped_matmul
from tests.helpers import expert_weights as weights
from tests.helpers import unfused_experts as unfused


def test_blocks_cover_each_expert_in_order():
    blocks = list(expert_blocks([300, 0, 5, 600], 256))
    assert blocks == [(0, 0, 256), (0, 256, 300), (2, 300, 305), (3, 305, 561), (3, 561, 817),
                      (3, 817, 905)]


def test_block_rows_bounds_the_first_projection():
    assert block_rows(2048, 4) * 2048 * 4 <= BLOCK_BYTES == 8 << 20
    assert block_rows(1 << 20, 4) == 256  # never fewer rows than that


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 0], [4, 4, 4]])
def test_gradcheck_float64(kind, counts):
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    w_in, w_out = weights(3, 4, 3, kind)
    assert torch.autograd.gradcheck(
        lambda a, b, c: expert_mlp(a, b, c, counts, kind), (x, w_in, w_out))


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
def test_matches_unfused_across_blocks(kind):
    counts = [20, 0, 1, 9]  # blocks of 8 rows: expert 0 spans three blocks, expert 3 two
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 8, dtype=torch.float64, requires_grad=True)
    w_in, w_out = weights(4, 8, 4, kind)
    g = torch.randn(sum(counts), 8, dtype=torch.float64)

    def blocked(x, w_in, w_out):
        return expert_mlp(x, w_in, w_out, counts, kind, max_block_rows=8)

    grads = torch.autograd.grad(blocked(x, w_in, w_out), (x, w_in, w_out), g)
    ref = torch.autograd.grad(unfused(x, w_in, w_out, counts, kind), (x, w_in, w_out), g)
    assert torch.autograd.gradcheck(blocked, (x, w_in, w_out))
    torch.testing.assert_close(blocked(x, w_in, w_out),
                               unfused(x, w_in, w_out, counts, kind))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("need", ["x", "w_in", "w_out", "weights"])
def test_only_the_inputs_that_need_gradients_get_them(need):
    counts = [2, 3]
    x = torch.randn(5, 4, requires_grad=need == "x")
    w_in, w_out = (w.detach().float() for w in weights(2, 4, 3, "swiglu"))
    w_in.requires_grad_(need in ("w_in", "weights"))
    w_out.requires_grad_(need in ("w_out", "weights"))
    expert_mlp(x, w_in, w_out, counts, "swiglu").sum().backward()
    ref_x = x.detach().requires_grad_(x.requires_grad)
    ref_in = w_in.detach().requires_grad_(w_in.requires_grad)
    ref_out = w_out.detach().requires_grad_(w_out.requires_grad)
    unfused(ref_x, ref_in, ref_out, counts, "swiglu").sum().backward()
    for got, want in ((x, ref_x), (w_in, ref_in), (w_out, ref_out)):
        assert (got.grad is None) == (want.grad is None)
        if got.grad is not None:
            torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
def test_bank_on_cpu_equals_the_grouped_gemm_path(kind):
    """ExpertBank.forward_slices (fused on a CPU) == grouped GEMMs around the activation."""
    torch.manual_seed(0)
    bank = ExpertBank(4, 8, 6, kind)
    counts = [5, 0, 7, 2]
    x = torch.randn(sum(counts), 8)
    h = grouped_matmul(x, bank.w_in, counts)
    want = grouped_matmul(activation(h, kind), bank.w_out, counts)
    torch.testing.assert_close(bank.forward_slices(x, counts), want)


def test_bfloat16_runs_and_keeps_the_dtype():
    w_in, w_out = (w.detach().to(torch.bfloat16) for w in weights(2, 4, 3, "swiglu"))
    x = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    y = expert_mlp(x, w_in, w_out, [2, 4], "swiglu")
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    ref = unfused(x.detach().double(), w_in.double(), w_out.double(), [2, 4], "swiglu")
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)


def test_flop_counter_sees_every_gemm():
    """Forward 2*n*(d*h_in + h*d) FLOPs, backward twice that (chapter 6 counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts, d, h = [6, 0, 10], 4, 3
    x = torch.randn(sum(counts), d, requires_grad=True)
    w_in, w_out = (w.detach().float().requires_grad_() for w in weights(3, d, h, "swiglu"))
    with FlopCounterMode(display=False) as fwd:
        y = expert_mlp(x, w_in, w_out, counts, "swiglu")
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    expected = 2 * sum(counts) * (d * 2 * h + h * d)
    assert fwd.get_total_flops() == expected and bwd.get_total_flops() == 2 * expected


@pytest.mark.parametrize("counts", [[2, 2], [1, 1, 1, 1], [5, -1, 0]])
def test_bad_counts_are_refused_before_any_work(counts):
    w_in, w_out = weights(3, 4, 3, "swiglu")
    with pytest.raises(ValueError, match="counts must hold E=3"):
        expert_mlp(torch.randn(4, 4, dtype=torch.float64), w_in, w_out, counts, "swiglu")


def test_unknown_kind_is_refused():
    w_in, w_out = weights(1, 4, 3, "relu")
    with pytest.raises(ValueError, match="kind"):
        expert_mlp(torch.randn(2, 4, dtype=torch.float64), w_in, w_out, [2], "tanh")
