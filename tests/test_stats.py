"""Routing statistics (moe_lib.stats): shares, utilisation by group, load CV, MaxVio, drops."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from moe_lib import apply_capacity, stats
from moe_lib.routing import make_routing
from tests.helpers import random_routing, routing_of

FAST = settings(max_examples=30, deadline=None, database=None)


def routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=g)
    return make_routing(z.topk(k).indices, torch.rand(T, k, generator=g), z)


@FAST
@given(st.integers(1, 20), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31),
       st.sampled_from([None, 0.5]))
def test_utilisation_rows_sum_to_one(T, E, G, seed, cf):
    r = apply_capacity(routing(T, E, min(2, E), seed), cf)
    groups = torch.randint(0, G, (T,), generator=torch.Generator().manual_seed(seed))
    m = stats.utilisation_by_group(r, groups, G)
    assert m.shape == (G, E)
    has_kept = torch.zeros(G, dtype=torch.bool).index_put_((groups[r.kept.any(1)],),
                                                           torch.tensor(True))
    torch.testing.assert_close(m.sum(1), has_kept.float())  # 1, or 0 for a group with nothing
    torch.testing.assert_close(stats.expert_shares(r).sum(), torch.tensor(1.0))


def test_utilisation_known_values():
    r = make_routing(torch.tensor([[0], [1], [1], [2]]), torch.ones(4, 1), torch.zeros(4, 3))
    m = stats.utilisation_by_group(r, torch.tensor([0, 0, 1, 1]), 3)
    torch.testing.assert_close(m, torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 0]]))
    with pytest.raises(ValueError, match="groups"):
        stats.utilisation_by_group(r, torch.tensor([0, 1]), 2)
    gates = stats.mean_gate_by_group(r, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5]]))
    steps = stats.shares_over_steps([r, r])
    torch.testing.assert_close(steps, torch.tensor([[0.25, 0.5, 0.25]] * 2))


def test_load_cv_and_max_violation_known_values():
    r = routing_of([[0], [0], [0], [1]], E=2)  # counts [3, 1]: std 1, mean 2
    assert stats.load_cv(r) == pytest.approx(0.5)
    assert stats.max_violation(r) == pytest.approx(0.5)  # 3 / 2 - 1
    balanced = routing_of([[0], [1], [2], [3]], E=4)
    assert stats.load_cv(balanced) == 0.0 and stats.max_violation(balanced) == 0.0


def test_drop_rate_and_shares_before_and_after_capacity():
    r = routing_of([[0], [0], [0], [1]], E=2)
    capped = apply_capacity(r, 0.5)  # C = ceil(0.5 * 4 * 1 / 2) = 1 slot per expert
    assert stats.drop_rate(r) == 0.0 and stats.drop_rate(capped) == 0.5
    torch.testing.assert_close(stats.expert_shares(capped), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(stats.expert_shares(capped, kept_only=False),
                               torch.tensor([0.75, 0.25]))


def test_empty_routing_gives_zeros():
    r = random_routing(0, 4, 2)
    assert stats.drop_rate(r) == 0.0 and stats.max_violation(r) == 0.0
    assert stats.expert_shares(r).tolist() == [0.0] * 4


@pytest.mark.parametrize("call, exc, name", [
    (lambda r: stats.expert_shares("r"), TypeError, "routing"),
    (lambda r: stats.expert_shares(r, kept_only=1), TypeError, "kept_only"),
    (lambda r: stats.load_cv(None), TypeError, "routing"),
    (lambda r: stats.drop_rate(r.expert_ids), TypeError, "routing"),
    (lambda r: stats.utilisation_by_group(r, torch.zeros(4), 2), TypeError, "groups"),
    (lambda r: stats.utilisation_by_group(r, torch.tensor([0, 1, 2, 0]), 2), ValueError,
     "groups"),
    (lambda r: stats.utilisation_by_group(r, torch.tensor([0, -1, 1, 0]), 2), ValueError,
     "groups"),
    (lambda r: stats.utilisation_by_group(r, torch.zeros(4, dtype=torch.long), 0), ValueError,
     "num_groups"),
    (lambda r: stats.mean_gate_by_group(r, torch.zeros(4, dtype=torch.long), 2.0), TypeError,
     "num_groups"),
    (lambda r: stats.shares_over_steps([]), ValueError, "routings"),
    (lambda r: stats.shares_over_steps(r), TypeError, "routings"),
    (lambda r: stats.shares_over_steps([r, "r"]), TypeError, "routings"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call(random_routing(4, 3, 2))
