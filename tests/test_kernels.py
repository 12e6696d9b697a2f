"""moe_lib.kernels.expert_mlp: the CPU path of ExpertBank.forward_slices.

It must give the values and gradients of the unfused path (two grouped GEMMs around the
activation, each differentiated by autograd or by its own backward), for every expert kind, with
and without per-expert biases, with empty experts, with experts split into several blocks, and
when only some inputs need gradients. Without biases it must take the same operations as before
biases existed (no addmm, no row sums).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lib import ExpertBank
from moe_lib.activations import ExpertActivation, activation, in_width
from moe_lib.kernels import BLOCK_BYTES, block_rows, expert_blocks, expert_mlp, grouped_matmul
from tests.helpers import expert_weights as weights
from tests.helpers import unfused_experts as unfused

CLAMPED = ExpertActivation("clamped_swiglu", alpha=1.702, limit=2.0)  # clamps often at scale 3
ALL_KINDS = ["relu", "gelu", "swiglu", "clamped_swiglu", CLAMPED]


def params(E, d, h, kind, bias=True, dtype=torch.float64, seed=0):
    """``w_in, w_out, b_in, b_out`` for any kind (biases None without ``bias``), requiring
    gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(E, d, in_width(h, kind)), (E, h, d)]
    shapes += [(E, in_width(h, kind)), (E, d)] if bias else []
    out = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]
    return out + [None, None] if not bias else out


def unfused_biased(x, w_in, w_out, b_in, b_out, counts, kind):
    """The reference: ``act(x_e @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` per expert slice,
    autograd throughout."""
    outs = [activation(rows @ w_in[e] + b_in[e], kind) @ w_out[e] + b_out[e]
            for e, rows in enumerate(x.split(counts))]
    return torch.cat(outs)


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


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
def test_bank_on_cpu_equals_the_grouped_gemm_path(kind, bias):
    """ExpertBank.forward_slices (fused on a CPU) == grouped GEMMs around the activation."""
    torch.manual_seed(0)
    bank = ExpertBank(4, 8, 6, kind, bias=bias)
    counts = [5, 0, 7, 2]
    x = 3 * torch.randn(sum(counts), 8)
    h = grouped_matmul(x, bank.w_in, counts, bank.b_in)
    want = grouped_matmul(activation(h, kind), bank.w_out, counts, bank.b_out)
    torch.testing.assert_close(bank.forward_slices(x, counts), want)


@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 0], [4, 4, 4]])
@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
def test_gradcheck_with_biases_float64(kind, counts):
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    ps = params(3, 4, 3, kind)

    def f(x, w_in, w_out, b_in, b_out):  # blocks of 2 rows: experts span several
        return expert_mlp(3 * x, w_in, w_out, counts, kind, max_block_rows=2, b_in=b_in,
                          b_out=b_out)

    assert torch.autograd.gradcheck(f, (x, *ps))


@pytest.mark.parametrize("kind", ["swiglu", "clamped_swiglu", CLAMPED], ids=str)
def test_gradcheck_clamped_without_biases_float64(kind):
    counts = [3, 0, 6]
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    w_in, w_out, _, _ = params(3, 4, 3, kind, bias=False)
    assert torch.autograd.gradcheck(
        lambda a, b, c: expert_mlp(3 * a, b, c, counts, kind, max_block_rows=2), (x, w_in, w_out))


@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
def test_biases_match_the_unfused_reference_across_blocks(kind):
    counts = [20, 0, 1, 9]  # blocks of 8 rows: expert 0 spans three blocks, expert 3 two
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 8, dtype=torch.float64, requires_grad=True)
    ps = params(4, 8, 4, kind)
    g = torch.randn(sum(counts), 8, dtype=torch.float64)
    y = expert_mlp(x, *ps[:2], counts, kind, max_block_rows=8, b_in=ps[2], b_out=ps[3])
    ref = unfused_biased(x, *ps, counts, kind)
    torch.testing.assert_close(y, ref)
    got, want = torch.autograd.grad(y, (x, *ps), g), torch.autograd.grad(ref, (x, *ps), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[3][1].eq(0).all() and got[4][1].eq(0).all()  # b_in, b_out of the expert without rows


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["relu", "swiglu"])
def test_without_biases_the_old_operations_run(kind):
    """b_in=None, b_out=None: the forward's GEMMs are plain mm and the backward sums no rows;
    with biases, addmm carries them and the backward sums the rows' gradients."""
    counts = [3, 5]
    x = torch.randn(8, 4, requires_grad=True)
    ps = [p.detach().float().requires_grad_() for p in params(2, 4, 3, kind)]
    logs = {}
    for bias in (False, True):
        b_in, b_out = ps[2:] if bias else (None, None)
        with _OpLog() as fwd:
            y = expert_mlp(x, *ps[:2], counts, kind, b_in=b_in, b_out=b_out)
        g = torch.randn_like(y)
        with _OpLog() as bwd:
            y.backward(g)
        logs[bias] = fwd.ops, bwd.ops
    (fwd, bwd), (fwd_b, bwd_b) = logs[False], logs[True]
    assert "mm" in fwd and "addmm" not in fwd and "sum" not in bwd
    assert "addmm" in fwd_b and "sum" in bwd_b and fwd_b - fwd == {"addmm"}


@pytest.mark.parametrize("need", ["b_in", "b_out", "x"])
def test_only_the_biases_that_need_gradients_get_them(need):
    counts = [2, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=need == "x")
    ps = [p.detach() for p in params(2, 4, 3, "clamped_swiglu")]
    ps[2].requires_grad_(need == "b_in")
    ps[3].requires_grad_(need == "b_out")
    expert_mlp(x, *ps[:2], counts, "clamped_swiglu", b_in=ps[2], b_out=ps[3]).sum().backward()
    assert [t.grad is not None for t in (x, ps[2], ps[3])] == [
        need == "x", need == "b_in", need == "b_out"]
    if need == "b_out":  # d b_out[e] = sum of the rows' gradients (all ones here)
        torch.testing.assert_close(ps[3].grad, torch.tensor([[2.0] * 4, [3.0] * 4],
                                                            dtype=torch.float64))


@pytest.mark.parametrize("counts", [[2, 0, 4], [0, 0, 0]])
def test_grouped_matmul_adds_each_experts_bias(counts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    parts = [rows @ w[e] + b[e] for e, rows in enumerate(x.split(counts))]
    torch.testing.assert_close(grouped_matmul(x, w, counts, b), torch.cat(parts))
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_matmul(x, w, counts, b), (x, w, b))


def test_bfloat16_runs_and_keeps_the_dtype():
    w_in, w_out = (w.detach().to(torch.bfloat16) for w in weights(2, 4, 3, "swiglu"))
    x = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    y = expert_mlp(x, w_in, w_out, [2, 4], "swiglu")
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    ref = unfused(x.detach().double(), w_in.double(), w_out.double(), [2, 4], "swiglu")
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)


def test_bfloat16_clamped_with_biases_keeps_the_dtype():
    ps = [p.detach().to(torch.bfloat16).requires_grad_() for p in params(2, 4, 3, CLAMPED)]
    x = (3 * torch.randn(6, 4)).to(torch.bfloat16).requires_grad_()
    y = expert_mlp(x, *ps[:2], [2, 4], CLAMPED, b_in=ps[2], b_out=ps[3])
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(t.grad.dtype == torch.bfloat16 for t in (x, *ps))
    ref = unfused_biased(x.detach().double(), *(p.detach().double() for p in ps), [2, 4], CLAMPED)
    torch.testing.assert_close(y.double(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "clamped_swiglu"])
def test_flop_counter_sees_every_gemm(kind, bias):
    """Forward 2*n*(d*h_in + h*d) FLOPs, backward twice that (chapter 6 counts them); biases add
    no GEMM FLOPs (addmm counts as its mm)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts, d, h = [6, 0, 10], 4, 3
    x = torch.randn(sum(counts), d, requires_grad=True)
    w_in, w_out, b_in, b_out = (None if p is None else p.detach().float().requires_grad_()
                                for p in params(3, d, h, kind, bias=bias))
    with FlopCounterMode(display=False) as fwd:
        y = expert_mlp(x, w_in, w_out, counts, kind, b_in=b_in, b_out=b_out)
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
