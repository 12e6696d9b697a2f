"""moe_lib.bench.paired: Student's t, the sign test, paired differences, McNemar, the bootstrap
over groups; each public function refuses bad input before any work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_lib.bench import paired
from moe_lib.bench.paired import (
    cluster_bootstrap,
    mcnemar,
    paired_difference,
    sign_test,
    t_cdf,
    t_quantile,
)


@pytest.mark.parametrize("df, p, expected", [
    (1, 0.975, 12.7062), (2, 0.975, 4.3027), (4, 0.975, 2.7764), (9, 0.995, 3.2498),
    (30, 0.975, 2.0423), (4, 0.025, -2.7764), (7, 0.5, 0.0),
])
def test_t_quantiles_match_the_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


def test_t_cdf_is_a_distribution_function():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-2.0, 5) == pytest.approx(1 - t_cdf(2.0, 5))
    xs = [-5, -1, 0, 0.5, 3]
    assert all(t_cdf(a, 6) < t_cdf(b, 6) for a, b in zip(xs, xs[1:]))
    # many degrees of freedom: the normal distribution
    assert t_cdf(1.959964, 10_000) == pytest.approx(0.975, abs=1e-4)


def test_sign_test_is_the_two_sided_binomial_tail():
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024)


def test_paired_difference_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.9, 2.0, 3.0, 5.5]
    d = paired_difference(a, b)
    diffs = np.array(a) - np.array(b)
    half = t_quantile(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert d.diffs == pytest.approx(tuple(diffs))
    assert (d.mean, d.std) == pytest.approx((diffs.mean(), diffs.std(ddof=1)))
    assert (d.low, d.high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert (d.positive, d.negative, d.n) == (4, 1, 5)
    assert d.sign_p == pytest.approx(sign_test(4, 1))
    assert "95% CI" in str(d)
    # tensors and arrays are accepted; a wider confidence gives a wider interval
    wide = paired_difference(torch.tensor(a), np.array(b), confidence=0.99)
    assert wide.low < d.low and wide.high > d.high
    pd = pytest.importorskip("pandas")
    assert paired_difference(pd.Series(a), pd.Series(b)) == d


def test_mcnemar_counts_only_the_discordant_examples():
    a = torch.tensor([True, True, True, False, False, True])
    b = torch.tensor([True, False, False, True, False, True])
    m = mcnemar(a, b)
    assert (m.n, m.only_a, m.only_b) == (6, 2, 1)
    assert m.diff == pytest.approx((4 - 3) / 6)
    assert m.p == pytest.approx(sign_test(2, 1))


def test_cluster_bootstrap_resamples_whole_groups():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=g) < 0.8
    b = torch.rand(400, generator=g) < 0.6
    groups = torch.arange(400) // 10
    diff, low, high = cluster_bootstrap(a, b, groups, draws=500, seed=1)
    assert diff == pytest.approx((a.float() - b.float()).mean().item())
    assert low < diff < high and low > 0
    assert cluster_bootstrap(a, b, groups, draws=500, seed=1) == (diff, low, high)  # seeded
    # identical classifiers: a zero-width interval at zero
    assert cluster_bootstrap(a, a, groups, draws=100) == (0.0, 0.0, 0.0)


BAD = [
    (lambda: t_cdf("1", 3), TypeError, "t"),
    (lambda: t_cdf(1.0, 0), ValueError, "df"),
    (lambda: t_quantile(1.0, 3), ValueError, "p"),
    (lambda: t_quantile(0.5, 2.5), TypeError, "df"),
    (lambda: sign_test(-1, 2), ValueError, "positive"),
    (lambda: sign_test(1, 2.0), TypeError, "negative"),
    (lambda: paired_difference([1.0], [2.0]), ValueError, "at least 2"),
    (lambda: paired_difference([1.0, 2.0], [1.0]), ValueError, "pair up"),
    (lambda: paired_difference("12", [1.0, 2.0]), TypeError, "a must"),
    (lambda: paired_difference([1.0, float("nan")], [1.0, 2.0]), ValueError, "finite"),
    (lambda: paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0), ValueError, "confidence"),
    (lambda: mcnemar(torch.ones(3), torch.ones(3, dtype=torch.bool)), TypeError, "correct_a"),
    (lambda: mcnemar(torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)),
     ValueError, "pair up"),
    (lambda: cluster_bootstrap(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
                               torch.zeros(3)), TypeError, "groups"),
    (lambda: cluster_bootstrap(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
                               torch.zeros(3, dtype=torch.long), draws=5), ValueError, "draws"),
]


@pytest.mark.parametrize("call, exc, word", BAD)
def test_bad_input_is_refused_with_a_message_that_names_it(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_every_public_function_has_a_bad_input_case():
    names = {n for n, o in vars(paired).items() if callable(o) and not n.startswith("_")
             and getattr(o, "__module__", None) == paired.__name__}
    records = {"PairedDifference", "McNemar"}  # built by the functions above
    called = {"t_cdf", "t_quantile", "sign_test", "paired_difference", "mcnemar",
              "cluster_bootstrap"}
    assert names - records == called
