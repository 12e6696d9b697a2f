"""Paired comparisons for the chapters' experiments: seeds, test sets, files.

Two models trained with the same seed see the same initial weights (where they share shapes)
and the same batches, so their results are compared seed by seed, not as two independent
samples. Two classifiers scored on the same test set are compared example by example.

- :func:`paired_difference`: per-seed differences ``a - b``; their mean, standard deviation
  and Student-t confidence interval, how many are positive, and the two-sided exact sign test.
- :func:`mcnemar`: McNemar's exact test for two classifiers on the same examples (only the
  examples that one gets right and the other wrong count).
- :func:`cluster_bootstrap`: a confidence interval for a difference of accuracies when the
  examples come in correlated groups (snippets of one file): resample whole groups.
- :func:`t_quantile`: quantiles of Student's t (no scipy needed).

None of these asserts a null: an interval that contains 0 says the data cannot tell the two
apart at this sample size, not that they are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moe_lib.checks import check_int, check_real, check_tensor


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function, P(T <= t) with ``df`` degrees of freedom:
    ``1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2`` for t >= 0, symmetric below."""
    check_real("t", t)
    check_int("df", df, low=1)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (p in (0, 1)), by bisection
    on :func:`t_cdf`; e.g. ``t_quantile(0.975, 4)`` is about 2.776."""
    check_real("p", p, 0.0, 1.0, low_open=True, high_open=True)
    check_int("df", df, low=1)
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def sign_test(positive: int, negative: int) -> float:
    """Two-sided exact sign test: the probability, with fair coins, of a split at least as
    uneven as ``positive : negative`` (ties are left out before calling). 1.0 with no data."""
    check_int("positive", positive, low=0)
    check_int("negative", negative, low=0)
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, negative) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """Per-pair differences ``a - b``: ``n`` pairs, their ``mean`` and ``std`` (n - 1 in the
    denominator), the ``confidence`` t interval ``[low, high]`` of the mean, ``positive`` and
    ``negative`` counts, and ``sign_p``, the two-sided sign test."""

    diffs: tuple[float, ...]
    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float
    positive: int
    negative: int
    sign_p: float

    def __str__(self) -> str:
        pct = round(100 * self.confidence)
        return (f"{self.mean:+.4f} (std {self.std:.4f}, {pct}% CI [{self.low:+.4f}, "
                f"{self.high:+.4f}], {self.positive} of {self.n} positive, sign test "
                f"p = {self.sign_p:.3f})")


def _as_vector(name: str, values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        check_tensor(name, values, dims=1, kind=("float", "int"))
        values = values.detach().cpu().double().numpy()
    elif callable(getattr(values, "to_numpy", None)):  # a pandas Series, without importing pandas
        values = values.to_numpy()
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise TypeError(f"{name} must be a list, tuple, numpy array, pandas Series or 1-d tensor "
                        f"of numbers, got {type(values).__name__}")
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} must hold finite numbers, got {out.tolist()}")
    return out


def paired_difference(a: object, b: object, confidence: float = 0.95) -> PairedDifference:
    """Differences ``a[i] - b[i]`` of paired results (same seed, same data), at least 2 pairs.

    The interval is ``mean +- t_{(1 + confidence) / 2, n - 1} * std / sqrt(n)``; with few pairs
    it is wide, as it should be.
    """
    x, y = _as_vector("a", a), _as_vector("b", b)
    if x.shape != y.shape:
        raise ValueError(f"a and b must pair up, got {x.size} and {y.size} values")
    if x.size < 2:
        raise ValueError(f"a and b must hold at least 2 pairs, got {x.size}")
    check_real("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    d = x - y
    n = int(d.size)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    return PairedDifference(tuple(float(v) for v in d), n, mean, std, mean - half, mean + half,
                            float(confidence), pos, neg, sign_test(pos, neg))


@dataclass(frozen=True)
class McNemar:
    """Two classifiers on the same examples: ``n`` examples, ``only_a`` right only for a,
    ``only_b`` right only for b, ``diff`` = accuracy(a) - accuracy(b), ``p`` the two-sided
    exact McNemar test (a sign test on the discordant examples)."""

    n: int
    only_a: int
    only_b: int
    diff: float
    p: float


def mcnemar(correct_a: object, correct_b: object) -> McNemar:
    """McNemar's exact test from two boolean vectors ``[n]``: example i right for a / for b."""
    check_tensor("correct_a", correct_a, dims=1, kind="bool")
    check_tensor("correct_b", correct_b, dims=1, kind="bool")
    if correct_a.shape != correct_b.shape or correct_a.numel() == 0:
        raise ValueError(f"correct_a and correct_b must be non-empty and pair up, got shapes "
                         f"{tuple(correct_a.shape)} and {tuple(correct_b.shape)}")
    ca, cb = correct_a.cpu(), correct_b.cpu()
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    n = ca.numel()
    return McNemar(n, only_a, only_b, (only_a - only_b) / n, sign_test(only_a, only_b))


def cluster_bootstrap(correct_a: object, correct_b: object, groups: object,
                      draws: int = 2000, confidence: float = 0.95, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Accuracy(a) - accuracy(b) and its percentile bootstrap interval over whole groups.

    ``correct_a, correct_b: [n]`` bool, ``groups: [n]`` int (say the file each test snippet
    comes from). Each draw resamples the groups with replacement and pools their examples, so
    examples that are correlated within a group stay together. Returns ``(diff, low, high)``.
    """
    check_tensor("correct_a", correct_a, dims=1, kind="bool")
    check_tensor("correct_b", correct_b, dims=1, kind="bool")
    check_tensor("groups", groups, dims=1, kind="int")
    if not (correct_a.shape == correct_b.shape == groups.shape) or groups.numel() == 0:
        raise ValueError("correct_a, correct_b and groups must be non-empty and of one length, "
                         f"got {tuple(correct_a.shape)}, {tuple(correct_b.shape)}, "
                         f"{tuple(groups.shape)}")
    check_int("draws", draws, low=10)
    check_real("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    check_int("seed", seed, low=0, high=2**32 - 1)
    _, g = torch.unique(groups.cpu(), return_inverse=True)
    n_groups = int(g.max()) + 1
    d = correct_a.cpu().double() - correct_b.cpu().double()
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, d).numpy()
    sizes = torch.bincount(g, minlength=n_groups).double().numpy()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n_groups, size=(draws, n_groups))
    boot = sums[pick].sum(1) / sizes[pick].sum(1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(d.mean()), float(low), float(high)
