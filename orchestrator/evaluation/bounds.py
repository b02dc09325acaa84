"""Exact confidence bounds of the offline gate: pure functions, counts in, bounds out.

Every bound here is one-sided at its own level `alpha`: P(true value < lower) <= alpha and
P(true value > upper) <= alpha. A gate check reads one side to pass and the other to fail
(`three_way`), and for any true value only one of the two verdicts is wrong, so a check
whose bounds are each at level a gives a wrong verdict with probability at most a.

- `clopper_pearson(k, n, a)`: bounds of a binomial rate from k successes in n trials
  (the Clopper-Pearson interval, via the beta quantiles).
- `paired_change(b, c, n, a)`: bounds of the change of a paired rate (candidate error -
  production error, or one retrieval hit rate minus another over the same queries) from
  the discordant pairs only: the exact McNemar test.
- `class_bounds(flips, counts, a)`: per-class Clopper-Pearson bounds, Bonferroni over the
  classes that have samples, so that the largest lower / largest upper bound the worst
  class's rate at level a.
"""

from __future__ import annotations

from typing import Sequence

# Float tolerance of a limit: NFR 2/100 against max_nfr 0.02 is at the limit, not over it.
EPS = 1e-12

VERDICTS = ("pass", "fail", "inconclusive")


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """(lower, upper) of a binomial rate p from k successes in n trials, each one-sided at
    level alpha: lower = Beta(alpha; k, n-k+1) quantile (0 when k = 0), upper =
    Beta(1-alpha; k+1, n-k) quantile (1 when k = n). n = 0 says nothing: (0, 1).

    By hand: k = 0 makes upper the p with (1-p)^n = alpha, so n = 2, alpha = 0.25 gives
    1 - sqrt(0.25) = 0.5; k = n = 2 mirrors it, lower 0.5. k = 1, n = 2: Beta(1, 2) has cdf
    1 - (1-x)^2 = 0.25 at lower = 1 - sqrt(0.75) = 0.1340, Beta(2, 1) has cdf x^2 = 0.75 at
    upper = sqrt(0.75) = 0.8660.
    """
    from scipy.stats import beta

    k, n = int(k), int(n)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n == 0:
        return 0.0, 1.0
    lower = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    upper = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lower, upper


def paired_change(b: int, c: int, n: int, alpha: float, limit: float = 0.0) -> tuple[float, float]:
    """(lower, upper) of the change of a paired rate over n pairs, from the discordant
    pairs: b pairs that got worse (production right, candidate wrong), c that got better;
    each bound one-sided at level alpha, for deciding the change against `limit`.

    limit 0 (only the sign matters): conditional on m = b + c, b ~ Binomial(m, pi) and
    the change is > 0 exactly when pi > 1/2, so Clopper-Pearson bounds of pi from b of m
    mapped through pi -> (m/n)(2 pi - 1) (increasing) decide the sign exactly: the exact
    McNemar test, valid for every m and so unconditionally (m = 0: (0, 0)). The numbers
    between are conditional on m, which is why another limit needs the second form.
    limit != 0: the change is p_b - p_c itself, bounded by Clopper-Pearson bounds of b/n
    and c/n at alpha/2 each (a union bound): lower = lo(b) - hi(c), upper = hi(b) - lo(c).
    Wider, but valid for a non-zero limit, where mapping through the observed m/n is not
    (its coverage depends on the unknown share of discordant pairs).

    By hand: b = 2, c = 0, n = 10, alpha = 0.25, limit 0: pi from 2 of 2 is in
    (sqrt(0.25), 1) = (0.5, 1), so the change (point 0.2) is in (0.2 * 0, 0.2 * 1) =
    (0, 0.2). b = 0, c = 0, n = 10, alpha 0.1, limit 0.05: hi(0 of 10 at 0.05) = 1 -
    0.05^(1/10) = 0.2589, so (0 - 0.2589, 0.2589 - 0).
    """
    b, c, n = int(b), int(c), int(n)
    m = b + c
    if b < 0 or c < 0 or m > n:
        raise ValueError(f"need b, c >= 0 and b + c <= n, got b={b}, c={c}, n={n}")
    if limit != 0:
        lo_b, hi_b = clopper_pearson(b, n, alpha / 2)
        lo_c, hi_c = clopper_pearson(c, n, alpha / 2)
        return lo_b - hi_c, hi_b - lo_c
    if m == 0:
        return 0.0, 0.0
    lo, hi = clopper_pearson(b, m, alpha)
    return (m / n) * (2 * lo - 1), (m / n) * (2 * hi - 1)


def class_bounds(flips: Sequence[int], counts: Sequence[int], alpha: float) -> tuple[list[float], list[float]]:
    """Per-class (lowers, uppers) of rate flips[i] / counts[i], each class at level
    alpha / K where K is the number of classes with samples (Bonferroni); a class without
    samples gets (0, 0), it has no rate to bound. max(lowers) and max(uppers) then bound
    the worst class's rate at level alpha: the worst true class exceeds max(uppers) only if
    its own upper is wrong (<= alpha / K), and max(lowers) exceeds the worst true rate only
    if some class's lower is wrong (<= K * alpha / K).

    By hand: flips (0, 2), counts (2, 2), alpha 0.5 -> K = 2, each at 0.25: class 0 is
    (0, 0.5), class 1 is (0.5, 1).
    """
    if len(flips) != len(counts):
        raise ValueError(f"flips and counts differ in length: {len(flips)} != {len(counts)}")
    k = sum(1 for n in counts if n > 0)
    lows, highs = [], []
    for f, n in zip(flips, counts):
        lo, hi = clopper_pearson(f, n, alpha / k) if n > 0 else (0.0, 0.0)
        lows.append(lo)
        highs.append(hi)
    return lows, highs


def three_way(lower: float, upper: float, limit: float, above: bool = False) -> str:
    """The verdict of bounds (lower, upper) of a value against its limit.

    Default (the value must be at most the limit): 'pass' when upper <= limit, 'fail' when
    lower > limit, else 'inconclusive'. `above` (the value must exceed the limit): 'pass'
    when lower > limit, 'fail' when upper < limit, else 'inconclusive'.

    By hand: (0.01, 0.03) against 0.02 is inconclusive; (0.0, 0.02) passes (inclusive);
    (0.021, 0.05) fails. Above 0: (0.01, 0.2) passes, (-0.2, -0.01) fails, (0, 0) is
    inconclusive.
    """
    if above:
        if lower > limit + EPS:
            return "pass"
        return "fail" if upper < limit - EPS else "inconclusive"
    if upper <= limit + EPS:
        return "pass"
    return "fail" if lower > limit + EPS else "inconclusive"


def overall(verdicts: Sequence[str]) -> str:
    """'fail' if any check fails, else 'pass' if all pass (none is a pass), else
    'inconclusive'."""
    if "fail" in verdicts:
        return "fail"
    return "pass" if all(v == "pass" for v in verdicts) else "inconclusive"
