"""The fast path's pieces (moe_lib.permute, the kernels' grouped_matmul and swiglu) and its
guarantees.

- each hand-written backward agrees with autograd on the plain-indexing reference and passes a
  float64 gradcheck, with and without dropped copies;
- the backward of the permutations runs no scatter (index_put_, index_add_, scatter*);
- dispatch="sorted" equals dispatch="loop" (fp32, rtol 1e-5) at a realistic size.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lib import ExpertBank, MoE
from moe_lib.activations import activation
from moe_lib.dispatch import dispatch_loop, dispatch_sorted
from moe_lib.kernels import gather_sum, grouped_matmul, grouped_mm_available, swiglu
from moe_lib.permute import permute, unpermute_combine
from tests.helpers import permutation_of as perm_of
from tests.helpers import random_routing


@pytest.mark.parametrize("drop", [None, 0.3, 1.0])
def test_permutation_puts_every_kept_copy_in_its_expert_slice(drop):
    r = random_routing(50, 6, 3, drop=drop)
    perm = perm_of(r)
    n = perm.num_kept
    assert n == int(r.kept.sum()) == sum(perm.counts)
    assert perm.has_dropped == (n < 150)
    ids_sorted = r.expert_ids.reshape(-1)[perm.order[:n]]
    assert torch.equal(ids_sorted, torch.sort(ids_sorted).values)  # grouped by expert
    # sorted row pos[t, j] holds copy (t, j); dropped copies point at row n
    t_idx, j_idx = torch.where(r.kept)
    assert torch.equal(perm.src[perm.pos[t_idx, j_idx]], t_idx)
    assert (perm.pos[~r.kept] == n).all()


@pytest.mark.parametrize("drop", [None, 0.3])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_permute_and_combine_match_plain_indexing(k, drop):
    """Values and gradients against autograd on x[src] and a masked weighted sum."""
    torch.manual_seed(0)
    r = random_routing(40, 6, k, drop=drop)
    perm = perm_of(r)
    x = torch.randn(40, 5, requires_grad=True)
    w = r.kept_weights.clone().requires_grad_()
    out = torch.randn(perm.num_kept, 5, requires_grad=True)
    gy, gxs = torch.randn(40, 5), torch.randn(perm.num_kept, 5)

    xs = permute(x, perm)
    y = unpermute_combine(out, w, perm)
    (xs * gxs).sum().backward()
    (y * gy).sum().backward()
    fast = (xs.detach(), y.detach(), x.grad, w.grad, out.grad)

    x2, w2, out2 = (t.detach().clone().requires_grad_() for t in (x, w, out))
    xs2 = x2[perm.src]
    padded = torch.cat([out2, out2.new_zeros(1, 5)])  # row n: the zero row of dropped copies
    y2 = (padded[perm.pos] * w2.unsqueeze(-1) * r.kept.unsqueeze(-1)).sum(1)
    (xs2 * gxs).sum().backward()
    (y2 * gy).sum().backward()
    ref = (xs2.detach(), y2.detach(), x2.grad, w2.grad * r.kept, out2.grad)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("drop", [None, 0.4])
def test_permutation_gradcheck_float64(drop):
    r = random_routing(7, 4, 2, seed=3, drop=drop, dtype=torch.float64)
    perm = perm_of(r)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = r.kept_weights.clone().requires_grad_()
    out = torch.randn(perm.num_kept, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, perm), (x,))
    assert torch.autograd.gradcheck(lambda o, w: unpermute_combine(o, w, perm), (out, w))


def test_gather_sum_is_a_weighted_gather():
    rows, pos = torch.randn(9, 4), torch.randint(0, 9, (5, 3))
    w = torch.rand(5, 3)
    torch.testing.assert_close(gather_sum(rows, pos), rows[pos].sum(1))
    torch.testing.assert_close(gather_sum(rows, pos, w), (rows[pos] * w[..., None]).sum(1))


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("drop", [None, 0.3])
def test_backward_of_the_permutations_has_no_scatter(drop):
    r = random_routing(64, 8, 2, drop=drop)
    perm = perm_of(r)
    x = torch.randn(64, 16, requires_grad=True)
    w = r.kept_weights.clone().requires_grad_()
    y = unpermute_combine(permute(x, perm) * 2.0, w, perm)
    with RecordOps() as rec:
        y.sum().backward()
    scatters = [op for op in rec.ops if "index_put" in op or "index_add" in op or "scatter" in op]
    assert rec.ops and not scatters, scatters


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grouped_matmul_matches_one_matmul_per_slice(counts, dtype):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 5, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 5, 3, dtype=dtype, requires_grad=True)
    g = torch.randn(sum(counts), 3, dtype=dtype)
    y = grouped_matmul(x, w, counts)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    parts = [rows @ w2[e] for e, rows in enumerate(x2.split(counts))]
    y2 = torch.cat(parts) if parts else x2.new_zeros(0, 3)
    (y2 * g).sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y, y2.detach(), **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    w2_grad = w2.grad if w2.grad is not None else torch.zeros_like(w2)
    torch.testing.assert_close(w.grad, w2_grad, **tol)  # zero for the experts with no rows


def test_grouped_matmul_gradcheck_float64():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: grouped_matmul(x, w, [2, 0, 4]), (x, w))


def test_grouped_mm_is_not_chosen_on_a_cpu():
    x, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(2, 16, 16, dtype=torch.bfloat16)
    assert not grouped_mm_available(x, w)


def test_fused_swiglu_matches_autograd():
    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(swiglu(h), activation(h, "swiglu"))
    assert torch.autograd.gradcheck(swiglu, (h,))
    g = torch.randn(10, 4, dtype=torch.float64)
    (a,) = torch.autograd.grad(swiglu(h), h, g)
    (b,) = torch.autograd.grad(activation(h, "swiglu"), h, g)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_sorted_equals_loop_at_a_realistic_size(kind, capacity):
    """The issue's tolerance: fp32 outputs and gradients allclose at rtol 1e-5."""
    torch.manual_seed(0)
    loop = MoE(32, 48, 8, top_k=2, expert=kind, dispatch="loop", capacity_factor=capacity)
    fast = MoE(32, 48, 8, top_k=2, expert=kind, dispatch="sorted", capacity_factor=capacity)
    fast.load_state_dict(loop.state_dict())
    x = torch.randn(512, 32)
    g = torch.randn(512, 32)
    results = []
    for layer in (loop, fast):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.y.backward(g)
        results.append([out.y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    if capacity is not None:
        assert out.routing.dropped > 0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_functions_agree_without_the_layer():
    torch.manual_seed(0)
    bank = ExpertBank(5, 12, 16, "swiglu")
    r = random_routing(100, 5, 3)
    x = torch.randn(100, 12)
    torch.testing.assert_close(dispatch_sorted(x, r, bank), dispatch_loop(x, r, bank),
                               rtol=1e-5, atol=1e-5)
