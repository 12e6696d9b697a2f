"""Modern routing: score -> select -> weight, group-limited selection, the selection bias and
its loss-free update, expert choice, shared experts, per-sequence capacity, padding masks, and
the balance losses beyond Switch's (moe_lib.routing, routers, capacity, losses, layer)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from moe_lib import MoE, apply_capacity, losses
from moe_lib.routers import ExpertChoiceRouter, TopKRouter, expert_choice_capacity
from moe_lib.routing import (
    make_routing,
    score_experts,
    select_experts,
    weigh_experts,
    with_groups,
)
from tests.helpers import grads

FAST = settings(max_examples=40, deadline=None, database=None)
SEEDS = st.integers(0, 2**31)


def deepseek_router(E=8, k=2, n_group=4, topk_group=2, scale=2.5, seed=0, d=6):
    torch.manual_seed(seed)
    return TopKRouter(d, E, k, "renormalize", score="sigmoid", n_group=n_group,
                      topk_group=topk_group, selection_bias=True, routed_scaling_factor=scale)


# ----------------------------------------------------------------------- the three steps


def test_score_softmax_and_sigmoid():
    z = torch.randn(5, 4, dtype=torch.float64)
    s, p = score_experts(z, "softmax")
    assert s is p and torch.allclose(p, z.softmax(-1))
    s, p = score_experts(z, "sigmoid")
    torch.testing.assert_close(s, z.sigmoid())
    torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=torch.float64))


@FAST
@given(SEEDS, st.sampled_from(["softmax", "sigmoid"]), st.integers(1, 4))
def test_renormalize_at_scale_one_sums_to_one(seed, score, k):
    z = torch.randn(7, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s, _ = score_experts(z, score)
    ids = select_experts(s, k)
    w = weigh_experts(ids, s, z, "renormalize")
    torch.testing.assert_close(w.sum(-1), torch.ones(7, dtype=torch.float64))
    w_scaled = weigh_experts(ids, s, z, "renormalize", routed_scaling_factor=2.5)
    torch.testing.assert_close(w_scaled, 2.5 * w)


def test_weightings_by_hand():
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 2]])
    s = z.softmax(-1)
    raw = weigh_experts(ids, s, z, "raw")
    torch.testing.assert_close(raw, s[:, [0, 2]])
    torch.testing.assert_close(weigh_experts(ids, s, z, "topk_softmax"),
                               torch.tensor([[2.0, 1.0]], dtype=torch.float64).softmax(-1))
    torch.testing.assert_close(weigh_experts(ids, s, z, "renormalize"),
                               raw / raw.sum(-1, keepdim=True))


def reference_group_select(choice, k, n_group, topk_group):
    """One token at a time, in plain Python: the DeepSeek-V3 rule with -inf masking."""
    out = []
    E = choice.shape[1]
    size = E // n_group
    for row in choice.tolist():
        groups = [sorted(row[g * size:(g + 1) * size], reverse=True)[:2] for g in range(n_group)]
        gscore = [sum(v) for v in groups]
        kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [(row[e], e) for e in range(E) if e // size in kept]
        out.append(sorted(e for _, e in sorted(cand, reverse=True)[:k]))
    return out


@FAST
@given(SEEDS, st.sampled_from([(8, 4, 2, 2), (8, 2, 1, 3), (12, 3, 2, 4), (6, 6, 2, 2)]),
       st.floats(-5.0, 5.0))
def test_masked_groups_never_win_even_with_negative_bias(seed, shape, bias_scale):
    """Experts of dropped groups get -inf: whatever the bias (large negative ones included),
    every chosen expert lies in a kept group, and the choice equals the by-hand rule."""
    E, n_group, topk_group, k = shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(9, E, generator=g, dtype=torch.float64)
    bias = torch.randn(E, generator=g, dtype=torch.float64) * bias_scale
    choice = scores + bias
    ids = select_experts(choice, k, n_group, topk_group)
    assert sorted(map(sorted, ids.tolist())) == sorted(
        reference_group_select(choice, k, n_group, topk_group))


def test_zero_fill_would_let_a_masked_expert_win():
    """Why -inf: the kept group's experts have negative biased scores here; a 0 fill of the
    dropped group would make its experts win."""
    choice = torch.tensor([[0.2, -0.9, -0.1, -0.2]])  # groups {0, 1}: -0.7 and {2, 3}: -0.3
    ids = select_experts(choice, 2, n_group=2, topk_group=1)
    assert sorted(ids[0].tolist()) == [2, 3]
    zero_filled = choice.masked_fill(torch.tensor([[True, True, False, False]]), 0.0)
    assert sorted(zero_filled.topk(2).indices[0].tolist()) == [0, 1]  # the bug a 0 fill has


@FAST
@given(SEEDS, st.floats(-3.0, 3.0), st.booleans())
def test_selection_bias_never_changes_gate_values(seed, bias_scale, grouped):
    """The bias changes which experts are chosen; the weights are always those of the
    unbiased scores of the chosen experts."""
    router = deepseek_router(seed=seed % 1000, n_group=4 if grouped else None,
                             topk_group=2 if grouped else None).double()
    with torch.no_grad():
        router.selection_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(seed))
                                    * bias_scale)
    x = torch.randn(11, 6, dtype=torch.float64)
    r = router(x)
    s = router.logits(x).sigmoid()
    chosen = s.gather(1, r.expert_ids)
    torch.testing.assert_close(r.weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    assert r.scores is not None and torch.equal(r.scores, s)


def test_selection_bias_changes_the_choice():
    router = deepseek_router(n_group=None, topk_group=None).double().eval()
    x = torch.randn(64, 6, dtype=torch.float64)
    before = router(x).tokens_per_expert
    with torch.no_grad():
        router.selection_bias[before.argmax()] = -10.0  # the busiest expert: never chosen now
    after = router(x).tokens_per_expert
    assert after[before.argmax()] == 0 and after.sum() == before.sum()


# ----------------------------------------------------------------- the loss-free update


def test_bias_update_counts_training_forwards_only_and_follows_the_sign_rule():
    router = deepseek_router(n_group=None, topk_group=None).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    router.eval()
    router(x)
    router.train()
    with torch.no_grad():
        router(x)
    assert router.load_counts.sum() == 0  # eval and no-grad passes are not counted
    counts = router(x).chosen_counts() + router(x[:10]).chosen_counts()  # two micro-batches
    assert torch.equal(router.load_counts, counts)
    bias_before = router.selection_bias.clone()
    change = router.update_selection_bias(1e-3)
    load = counts.double()
    torch.testing.assert_close(change, 1e-3 * torch.sign(load.mean() - load))
    torch.testing.assert_close(router.selection_bias, bias_before + change)
    assert router.load_counts.sum() == 0  # counts restart
    assert not router.update_selection_bias(1e-3).any()  # nothing counted: no change


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    layer = MoE(8, 16, 8, top_k=2, score="sigmoid", selection_bias=True)
    with torch.no_grad():
        layer.router.gate.weight[0] += 1.0  # expert 0 gets most tokens
    x = torch.randn(512, 8) + 0.5
    vio = []
    for _ in range(200):
        out = layer(x)
        counts = out.routing.tokens_per_expert.float()
        vio.append(float(counts.max() / counts.mean() - 1))
        layer.update_selection_bias(0.01)
    assert vio[-1] < 0.3 * vio[0]


# --------------------------------------------------------------------------- expert choice


@FAST
@given(SEEDS, st.integers(1, 40), st.integers(1, 6), st.floats(0.25, 4.0))
def test_expert_choice_gives_every_expert_exactly_c_tokens(seed, T, E, c):
    torch.manual_seed(seed % 1000)
    router = ExpertChoiceRouter(5, E, capacity_factor=c)
    r = router(torch.randn(T, 5))
    C = expert_choice_capacity(c, T, E)
    assert C == min(T, math.ceil(c * T / E))
    assert r.tokens_per_expert.tolist() == [C] * E
    per_token = r.kept.sum(1)
    assert per_token.min() >= 0 and per_token.max() <= E and per_token.sum() == C * E
    gates = r.gates(kept_only=True)
    torch.testing.assert_close(gates, r.probs * r.selected)


def test_expert_choice_is_not_causal():
    """Changing a later token changes whether an earlier token is taken."""
    torch.manual_seed(0)
    router = ExpertChoiceRouter(4, 2, capacity_factor=1.0)
    x = torch.randn(6, 4)
    before = router(x).selected[0].clone()
    x2 = x.clone()
    z0 = router.logits(x[:1])
    e = int(before.nonzero()[0]) if before.any() else int(z0.argmax())
    direction = router.gate.weight[e] - router.gate.weight[1 - e]
    x2[5] = 100.0 * direction / direction.norm()  # the last token now wants expert e badly
    x2[4] = x2[5]
    x2[3] = x2[5]
    after = router(x2).selected[0]
    assert not torch.equal(before, after)


# ---------------------------------------------------------------------- loop == sorted


ROUTER_OPTIONS = [
    dict(score="sigmoid", weighting="renormalize"),
    dict(score="sigmoid", n_group=4, topk_group=2, selection_bias=True,
         routed_scaling_factor=2.5),
    dict(weighting="raw", router_bias=True),
    dict(weighting="topk_softmax", routed_scaling_factor=1.5),
    dict(router="expert_choice", capacity_factor=1.5, top_k=None),
    dict(n_shared=2, d_shared=3, shared_gate=True),
    dict(n_shared=1, score="sigmoid"),
    dict(capacity=3, capacity_per="sequence"),
    dict(capacity_factor=0.75, capacity_per="sequence", balance_loss="switch_per_sequence"),
    dict(balance_loss="sequence_wise", score="sigmoid"),
]


@pytest.mark.parametrize("options", ROUTER_OPTIONS, ids=lambda o: ",".join(sorted(o)))
def test_loop_sorted_and_dense_dispatch_agree_for_every_router(options):
    options = dict(options)
    top_k = options.pop("top_k", 2)
    results = []
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    first = None
    for dispatch in ("loop", "sorted", "dense"):
        torch.manual_seed(0)
        layer = MoE(6, 5, 8, top_k=top_k, dispatch=dispatch, **options).double()
        if first is None:
            first = layer
        layer.load_state_dict(first.state_dict())
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out.y.pow(2).sum() + out.aux_loss).backward()
        results.append((out, grads(layer, xi)))
    (a, ga), *rest = results
    for b, gb in rest:
        assert torch.equal(a.routing.expert_ids, b.routing.expert_ids)
        assert torch.equal(a.routing.kept, b.routing.kept)
        torch.testing.assert_close(a.y, b.y)
        torch.testing.assert_close(a.aux_loss, b.aux_loss)
        for g1, g2 in zip(ga, gb, strict=True):
            torch.testing.assert_close(g1, g2)


# ------------------------------------------------------------------------------ capacity


def reference_capacity(ids, groups, E, C_of_group):
    """Slot-major queues per (group, expert), in plain Python."""
    T, k = ids.shape
    used: dict[tuple[int, int], int] = {}
    kept = [[False] * k for _ in range(T)]
    for j in range(k):
        for t in range(T):
            key = (int(groups[t]), int(ids[t, j]))
            if used.get(key, 0) < C_of_group[int(groups[t])]:
                kept[t][j] = True
                used[key] = used.get(key, 0) + 1
    return torch.tensor(kept)


@FAST
@given(SEEDS, st.integers(1, 4), st.integers(1, 9), st.integers(1, 6), st.integers(1, 3),
       st.one_of(st.integers(0, 4), st.floats(0.1, 3.0)))
def test_per_group_capacity_matches_brute_force(seed, G, S, E, k, cap):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    T = G * S
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    r = make_routing(ids, torch.ones(T, k), torch.zeros(T, E))
    groups = torch.arange(G).repeat_interleave(S)
    r = with_groups(r, groups, G)
    if isinstance(cap, int):
        out = apply_capacity(r, capacity=cap, per_group=True) if cap else None
        C = [cap] * G
    else:
        out = apply_capacity(r, cap, per_group=True)
        C = [min(S, math.ceil(cap * S * k / E)) if cap * k < E else S for _ in range(G)]
    if out is None:
        return
    assert torch.equal(out.kept, reference_capacity(ids, groups, E, C))
    pooled = apply_capacity(r, capacity=max(1, cap) if isinstance(cap, int) else None) \
        if isinstance(cap, int) else apply_capacity(r, cap)
    assert torch.equal(pooled.kept, reference_capacity(ids, torch.zeros(T, dtype=torch.long),
                                                       E, [pooled_c(cap, T, k, E)]))


def pooled_c(cap, T, k, E):
    if isinstance(cap, int):
        return max(1, cap)
    return T if cap * k >= E else min(T, math.ceil(cap * T * k / E))


def test_capacity_per_sequence_in_the_layer():
    torch.manual_seed(0)
    layer = MoE(6, 5, 4, top_k=1, capacity=1, capacity_per="sequence")
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0  # every token wants expert 0
    x = torch.zeros(3, 5, 6)
    x[..., 0] = 1.0
    r = layer(x).routing
    assert r.tokens_per_expert.tolist() == [3, 0, 0, 0]  # one slot per sequence, 3 sequences
    assert r.kept.view(3, 5)[:, 0].all() and not r.kept.view(3, 5)[:, 1:].any()


# ---------------------------------------------------------------------------- padding


@FAST
@given(SEEDS, st.sampled_from(ROUTER_OPTIONS[:4] + ROUTER_OPTIONS[5:]),
       st.sampled_from(["loop", "sorted"]))
def test_padding_never_changes_real_tokens_or_losses(seed, options, dispatch):
    options = dict(options)
    top_k = options.pop("top_k", 2)
    torch.manual_seed(seed % 1000)
    layer = MoE(6, 5, 8, top_k=top_k, dispatch=dispatch, z_loss_coef=1e-3,
                **{"balance_loss": "switch", **options}).double().eval()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (3,), generator=g)
    mask = torch.arange(6)[None, :] < lengths[:, None]  # [3, 6] right padding
    x = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    garbage = x.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), 6, generator=g, dtype=torch.float64)
    a, b = layer(x, mask), layer(garbage, mask.long())
    torch.testing.assert_close(a.y, b.y)
    assert (a.y[~mask] == 0).all()
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    assert a.routing.num_tokens == int(mask.sum())


def test_padded_tokens_take_no_capacity_and_match_the_unpadded_sequences():
    torch.manual_seed(0)
    layer = MoE(6, 5, 4, top_k=2, capacity_factor=1.0, capacity_per="sequence",
                balance_loss="switch_per_sequence").double().eval()
    seqs = [torch.randn(n, 6, dtype=torch.float64) for n in (5, 3)]
    x = torch.zeros(2, 5, 6, dtype=torch.float64)
    x[0], x[1, :3] = seqs[0], seqs[1]
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    out = layer(x, mask)
    for i, s in enumerate(seqs):
        alone = layer(s[None])
        torch.testing.assert_close(out.y[i, : s.shape[0]], alone.y[0])


# ------------------------------------------------------------------------------- losses


def test_sequence_wise_loss_by_hand_and_uniform_value():
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])  # one sequence, 4 experts, k = 2
    probs = torch.full((4, 4), 0.25)
    r = make_routing(ids, torch.ones(4, 2), probs.log(), probs=probs)
    assert losses.sequence_balance_loss(r).item() == pytest.approx(1.0)  # uniform
    z = torch.randn(4, 4)
    s = z.sigmoid()
    p = s / s.sum(-1, keepdim=True)
    r = make_routing(ids, torch.ones(4, 2), z, probs=p, scores=s)
    f = 4 / (2 * 4) * torch.bincount(ids.reshape(-1), minlength=4).float()
    torch.testing.assert_close(losses.sequence_balance_loss(r), (f * p.mean(0)).sum())
    two = with_groups(make_routing(ids.repeat(2, 1), torch.ones(8, 2), z.repeat(2, 1),
                                   probs=p.repeat(2, 1)),
                      torch.arange(2).repeat_interleave(4), 2)
    torch.testing.assert_close(losses.sequence_balance_loss(two), (f * p.mean(0)).sum())


def test_pooled_switch_loss_is_the_loss_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    rs = []
    for T in (5, 9, 4):
        z = torch.randn(T, 6, generator=g, dtype=torch.float64)
        rs.append(make_routing(z.topk(2).indices, torch.ones(T, 2, dtype=torch.float64), z))
    cat = make_routing(torch.cat([r.expert_ids for r in rs]),
                       torch.ones(18, 2, dtype=torch.float64),
                       torch.cat([r.logits for r in rs]))
    torch.testing.assert_close(losses.pooled_switch_loss(rs), losses.switch_loss(cat))
    per_layer = sum(losses.switch_loss(r) for r in rs)
    assert per_layer.item() != pytest.approx(losses.pooled_switch_loss(rs).item())
    # global batch: f from the pooled counts, P local
    counts = sum(r.chosen_counts() for r in rs)
    g_loss = losses.switch_loss(rs[0], global_counts=counts, global_tokens=18)
    torch.testing.assert_close(g_loss, 6 * ((counts / 18) * rs[0].probs.mean(0)).sum())


def test_switch_loss_per_sequence():
    ids = torch.tensor([[0], [0], [1], [1]])
    z = torch.zeros(4, 2, dtype=torch.float64)
    r = with_groups(make_routing(ids, torch.ones(4, 1, dtype=torch.float64), z),
                    torch.tensor([0, 0, 1, 1]), 2)
    # each sequence sends everything to one expert: f = (1, 0) or (0, 1), P = (.5, .5): 2 * .5
    assert losses.switch_loss(r, per_group=True).item() == pytest.approx(1.0)
    assert losses.switch_loss(r).item() == pytest.approx(1.0)  # pooled: f = (.5, .5)


# ------------------------------------------------------------------ shared experts, counts


def test_shared_experts_by_hand_and_parameter_counts():
    torch.manual_seed(0)
    layer = MoE(6, 5, 4, top_k=2, n_shared=2, d_shared=3, shared_gate=True).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    routed = MoE(6, 5, 4, top_k=2).double()
    routed.router.load_state_dict(layer.router.state_dict())
    routed.experts.load_state_dict(layer.experts.state_dict())
    gate = torch.sigmoid(x @ layer.shared.gate.weight.t())
    want = routed(x).y + gate * layer.shared.ffn(x)
    torch.testing.assert_close(layer(x).y, want)
    counts = layer.parameter_counts()
    shared = 6 * 2 * 6 + 6 * 6 + 6  # FFN of hidden 2*3 (SwiGLU: 3 d h) + gate
    assert counts.total == 4 * 6 + 4 * 3 * 6 * 5 + shared
    assert counts.active == 4 * 6 + 2 * 3 * 6 * 5 + shared


def test_config_round_trip_with_modern_options():
    layer = MoE(8, 4, 8, score="sigmoid", n_group=4, topk_group=2, selection_bias=True,
                routed_scaling_factor=2.5, n_shared=1, capacity=4, capacity_per="sequence",
                balance_loss="sequence_wise")
    c = layer.config
    assert (c.top_k, c.weighting, c.balance_coef, c.d_shared) == (2, "renormalize", 1e-4, 4)
    assert MoE.from_config(c).config == c
    assert "selection_bias" in dict(layer.router.named_buffers())
    assert "load_counts" not in layer.state_dict()  # transient, not saved


def test_selection_bias_stays_float32_in_a_bfloat16_layer():
    layer = MoE(8, 4, 4, score="sigmoid", selection_bias=True)
    with torch.no_grad():
        layer.router.selection_bias.fill_(0.5)
    layer = layer.to(torch.bfloat16)
    assert layer.router.selection_bias.dtype == torch.float32
    layer.train()
    layer(torch.randn(16, 8, dtype=torch.bfloat16))
    change = layer.update_selection_bias(1e-3)
    assert set(change.abs().unique().tolist()) <= {0.0, torch.tensor(1e-3).item()}
    assert torch.allclose(layer.router.selection_bias, 0.5 + change)
