"""The inference path and moe_lib.inference: the direct dispatch equals the sorted one, coverage
formulas, expert caches, weight-only int8 experts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lib import ExpertBank, MoE
from moe_lib.dispatch import (
    DIRECT_MAX_COPIES_PER_EXPERT,
    DISPATCH_KINDS,
    direct_plan,
    dispatch_direct,
    dispatch_loop,
    dispatch_sorted,
)
from moe_lib.inference import (
    CacheResult,
    Int8ExpertBank,
    choice_shares,
    dequantize_int8,
    expected_touched,
    expected_touched_from_shares,
    quantize_int8,
    simulate_expert_cache,
    touched_per_batch,
)
from tests.helpers import grads, random_routing, routing_of

CONFIGS = [
    {},
    {"top_k": 1},
    {"top_k": 3},
    {"capacity_factor": 0.5},
    {"expert": "clamped_swiglu", "expert_bias": True},
    {"expert": "gelu", "n_shared": 1},
    {"score": "sigmoid", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
]


def _pair(seed=0, d=16, h=16, **kwargs):
    torch.manual_seed(seed)
    sorted_ = MoE(d, h, 6, dispatch="sorted", **kwargs)
    direct = MoE(d, h, 6, dispatch="direct", **kwargs)
    direct.load_state_dict(sorted_.state_dict())
    return sorted_, direct


# ------------------------------------------------------------------------------ direct dispatch


def test_direct_is_a_dispatch_kind_of_the_config():
    assert "direct" in DISPATCH_KINDS
    assert MoE(8, 4, 4, dispatch="direct").config.dispatch == "direct"


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
@pytest.mark.parametrize("T", [1, 2, 6, 8, 50])
def test_direct_equals_sorted_bit_for_bit_in_eval(kwargs, T):
    """Widths of 16 floats (64-byte rows): the same kernels on equally aligned buffers."""
    sorted_, direct = _pair(**kwargs)
    x = torch.randn(T, 16)
    with torch.no_grad():
        a, b = sorted_.eval()(x), direct.eval()(x)
    assert torch.equal(a.routing.expert_ids, b.routing.expert_ids)
    assert torch.equal(a.y, b.y)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_direct_equals_sorted_to_rounding_at_odd_widths(kwargs):
    """Rows of 12 and 10 floats: a BLAS may round differently on unaligned buffers."""
    sorted_, direct = _pair(d=12, h=10, **kwargs)
    x = torch.randn(8, 12)
    with torch.no_grad():
        torch.testing.assert_close(direct.eval()(x).y, sorted_.eval()(x).y, atol=1e-6,
                                   rtol=1e-5)


@pytest.mark.parametrize("kwargs", CONFIGS[:5], ids=str)
def test_direct_gradients_equal_sorted(kwargs):
    """Autograd differentiates the direct dispatch: the same gradients as the sorted one."""
    sorted_, direct = _pair(seed=1, **kwargs)
    x = torch.randn(3, 16)  # T k <= E (but for top_k=3): the direct loop itself
    g = torch.randn(3, 16)
    results = []
    for layer in (sorted_, direct):
        xi = x.clone().requires_grad_()
        layer(xi).y.backward(g)
        results.append(grads(layer, xi))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_direct_equals_the_loop_on_a_routing_with_dropped_copies():
    bank = ExpertBank(5, 6, 4)
    r = random_routing(2, 5, 2, seed=2, drop=0.5)
    assert r.dropped == 1
    x = torch.randn(2, 6)
    torch.testing.assert_close(dispatch_direct(x, r, bank), dispatch_loop(x, r, bank))
    assert torch.equal(dispatch_direct(x, r, bank), dispatch_sorted(x, r, bank))
    everything = r.with_kept(torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(dispatch_direct(x, everything, bank), torch.zeros(2, 6))


def test_direct_handles_zero_tokens_and_keeps_the_graph():
    x = torch.zeros(0, 6, requires_grad=True)
    out = MoE(6, 5, 3, top_k=2, dispatch="direct")(x)
    out.y.sum().backward()
    assert x.grad.shape == (0, 6)


def test_direct_plan_lists_each_experts_copies_in_token_order():
    r = routing_of([[2, 0], [0, 1], [2, 1]], E=4)
    copies, dropped = direct_plan(r)
    assert copies == {0: [1, 2], 1: [3, 5], 2: [0, 4]} and list(copies) == [0, 1, 2]
    assert not dropped
    kept = torch.tensor([[True, False], [True, True], [False, True]])
    copies, dropped = direct_plan(r.with_kept(kept))
    assert copies == {0: [2], 1: [3, 5], 2: [0]} and dropped


class _MatmulLog(TorchDispatchMode):
    """Records (rows, weight shape) of every matrix product that runs in the block, and the
    names of all operators."""

    def __init__(self):
        super().__init__()
        self.products, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__)
        if func.overloadpacket.__name__ in ("mm", "addmm"):
            a, b = args[-2:]
            self.products.append((a.shape[0], tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def test_direct_runs_each_chosen_expert_once_on_all_its_tokens():
    torch.manual_seed(0)
    bank = ExpertBank(8, 6, 5)  # w_in[e]: [6, 10], w_out[e]: [5, 6]
    r = random_routing(4, 8, 2, seed=3)
    with torch.no_grad(), _MatmulLog() as log:
        dispatch_direct(torch.randn(4, 6), r, bank)
    assert "sort.stable" not in log.ops
    chosen = torch.bincount(r.expert_ids.reshape(-1), minlength=8)
    per_expert = [int(n) for n in chosen.tolist() if n]
    assert log.products == [p for n in per_expert for p in ((n, (6, 10)), (n, (5, 6)))]


def test_direct_hands_batches_of_more_than_one_copy_per_expert_to_the_sorted_path():
    assert DIRECT_MAX_COPIES_PER_EXPERT == 1
    bank = ExpertBank(4, 6, 5)
    for T, sorted_path in ((2, False), (3, True)):  # 2 * 2 copies <= 4 experts < 3 * 2
        r = random_routing(T, 4, 2, seed=T)
        x = torch.randn(T, 6)
        with torch.no_grad(), _MatmulLog() as log:
            y = dispatch_direct(x, r, bank)
        assert ("sort.stable" in log.ops) == sorted_path  # the sorted path's argsort
        assert torch.equal(y, dispatch_sorted(x, r, bank))


def test_forward_rows_is_the_experts_ffn():
    bank = ExpertBank(3, 6, 4, "clamped_swiglu", bias=True).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    for e in range(3):
        torch.testing.assert_close(bank.forward_rows(e, x), bank.forward_expert(e, x))
    with pytest.raises(ValueError, match="e must be"):
        bank.forward_rows(3, x)


# ------------------------------------------------------------------------------ coverage


@pytest.mark.parametrize("E, k", [(8, 2), (64, 6), (4, 4)])
def test_expected_touched_formula_and_monte_carlo(E, k):
    assert expected_touched(E, k, 0) == 0.0
    assert expected_touched(E, k, 1) == pytest.approx(k)
    assert expected_touched(E, k, 16) == pytest.approx(E * (1 - (1 - k / E) ** 16))
    # uniform routing drawn at random: the mean count of distinct experts follows the formula
    r = random_routing(4000, E, k, seed=7)
    for B in (1, 4, 16):
        measured = touched_per_batch(r.expert_ids, E, B).mean().item()
        assert measured == pytest.approx(expected_touched(E, k, B), rel=0.03)


def test_mixtral_touches_99_percent_of_its_experts_at_batch_16():
    assert expected_touched(8, 2, 16) / 8 == pytest.approx(0.99, abs=0.005)


def test_expected_touched_from_shares():
    uniform = torch.full((8,), 2 / 8, dtype=torch.float64)
    assert expected_touched_from_shares(uniform, 5) == pytest.approx(expected_touched(8, 2, 5))
    skewed = torch.tensor([0.9, 0.9, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])
    assert expected_touched_from_shares(skewed, 5) < expected_touched(8, 2, 5)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    torch.testing.assert_close(choice_shares(ids, 4),
                               torch.tensor([0.75, 0.75, 0.25, 0.25], dtype=torch.float64))


def test_touched_per_batch_consecutive_and_random():
    ids = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3], [0, 1], [2, 3]])
    assert touched_per_batch(ids, 4, 2).tolist() == [2.0, 2.0, 4.0]  # runs share experts
    assert touched_per_batch(ids, 4, 6, mode="random", samples=3).tolist() == [4.0] * 3
    rand = touched_per_batch(ids, 4, 2, mode="random", samples=200,
                             generator=torch.Generator().manual_seed(0))
    assert rand.shape == (200,) and set(rand.tolist()) <= {2.0, 4.0}


# ------------------------------------------------------------------------------ caches


def test_lru_lfu_and_belady_on_a_trace_worked_by_hand():
    # one expert per token, E = 3, a cache of 2 (m: miss, h: hit; "ev" the evicted expert)
    # LRU:    0m 1m 0h 2m(ev 1) 1m(ev 0) 0m(ev 2) 2m(ev 1) 2h 1m(ev 0)          -> 2 hits
    # LFU:    0m 1m 0h 2m(ev 1: 1 use vs 2) 1m(ev 2: 1 use vs 2) 0h 2m(ev 1: 2 vs 3) 2h
    #         1m(ev 0: 3 uses each, the older goes)                              -> 3 hits
    # Belady: 0m 1m 0h 2m(ev 0: next use t5, 1's t4) 1h 0m(ev 1: t8, 2's t6) 2h 2h 1m
    #                                                                            -> 4 hits
    ids = torch.tensor([[0], [1], [0], [2], [1], [0], [2], [2], [1]])
    results = {p: simulate_expert_cache(ids, 3, 2, p) for p in ("lru", "lfu", "belady")}
    assert {p: r.hits for p, r in results.items()} == {"lru": 2, "lfu": 3, "belady": 4}
    assert results["lru"] == CacheResult("lru", 2, 9, 2)
    assert results["lru"].misses == 7 and results["lru"].hit_rate == pytest.approx(2 / 9)


def test_belady_is_best_and_a_full_cache_misses_each_expert_once():
    r = random_routing(300, 8, 2, seed=5)
    for capacity in (2, 4, 6):
        hits = {p: simulate_expert_cache(r.expert_ids, 8, capacity, p).hits
                for p in ("lru", "lfu", "belady")}
        assert hits["belady"] >= max(hits["lru"], hits["lfu"])
    full = simulate_expert_cache(r.expert_ids, 8, 8, "lru")
    assert full.misses == 8  # the compulsory misses only


def test_a_token_never_evicts_its_own_experts():
    # capacity k = 2: token 1 must evict 0 then 1 (not its own 2); token 2 loads 0 by evicting
    # 3, not 2, which it needs next: one hit
    ids = torch.tensor([[0, 1], [2, 3], [0, 2]])
    for policy in ("lru", "lfu", "belady"):
        assert simulate_expert_cache(ids, 4, 2, policy).hits == 1, policy


# ------------------------------------------------------------------------------ int8


def test_quantize_int8_rounds_each_column_to_its_grid():
    w = torch.randn(3, 5, 4)
    w[1, :, 2] = 0.0  # an all-zero column
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (3, 1, 4)
    assert int(q.abs().max()) == 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s / 2 + 1e-7).all()
    assert torch.equal(dequantize_int8(q, s)[1, :, 2], torch.zeros(5))


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "direct"])
def test_int8_bank_in_a_layer_is_close_to_float_and_four_times_smaller(dispatch):
    torch.manual_seed(0)
    layer = MoE(32, 48, 4, dispatch=dispatch).eval()
    x = torch.randn(40, 32)
    with torch.no_grad():
        y = layer(x).y
        float_bytes = sum(p.numel() * 4 for p in layer.experts.parameters())
        layer.experts = Int8ExpertBank(layer.experts)
        yq = layer(x).y
    rel = (yq - y).norm() / y.norm()
    assert 0 < rel < 0.02
    E, h_in = 4, 2 * 48
    scales = 4 * (E * h_in + E * 32)  # one float32 per output column
    assert layer.experts.weight_bytes() == float_bytes // 4 + scales < 0.3 * float_bytes
    assert layer.experts.params_per_expert() == 3 * 32 * 48


def test_int8_bank_gives_the_same_outputs_on_every_path():
    torch.manual_seed(0)
    bank = Int8ExpertBank(ExpertBank(4, 8, 6, "clamped_swiglu", bias=True))
    for T in (2, 10):  # the direct loop, then the sorted path
        r = random_routing(T, 4, 2, seed=2)
        x = torch.randn(T, 8)
        y = dispatch_sorted(x, r, bank)
        torch.testing.assert_close(dispatch_direct(x, r, bank), y)
        torch.testing.assert_close(dispatch_loop(x, r, bank), y)
    assert math.isclose(bank.w_in.abs().max().item(), bank.s_in.max().item() * 127, rel_tol=1e-6)
