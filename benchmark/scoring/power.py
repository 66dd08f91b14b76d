"""Power of a paired comparison: the minimum detectable effect (MDE).

For a paired two-sided t-test on n per-user differences with standard deviation sd, the
MDE at level alpha and power 1 - beta is delta * sd, where the standardized effect delta
solves

    P(|T| > t_{1 - alpha/2, n - 1}) = 1 - beta,   T ~ noncentral t(df = n - 1, nc = delta * sqrt(n))

Both rejection tails are counted, as statsmodels' `TTestPower` does. The equation is
solved exactly (scipy's noncentral t, Brent's method), not by the normal approximation
(z_{1-alpha/2} + z_{1-beta}) * sd / sqrt(n), which it approaches for large n (it is about
1% smaller at n = 100). Cohen (1988), Statistical Power Analysis for the Behavioral
Sciences, ch. 2.

A comparison whose observed |mean difference| is below its MDE is underpowered: at this
many users a real difference of that size would be missed more often than 1 - power, so
"not significant" there does not mean "no difference".
"""

from __future__ import annotations

import math

from scipy import optimize
from scipy import stats as sps

POWER = 0.8  # the power at which the leaderboard states each comparison's MDE


def t_test_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample (paired) t-test with n observations at standardized effect."""
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 users, got {n}")
    df = n - 1
    crit = sps.t.ppf(1.0 - alpha / 2.0, df)
    nc = abs(effect) * math.sqrt(n)
    upper = float(sps.nct.sf(crit, df, nc))
    lower = float(sps.nct.cdf(-crit, df, nc))  # the far tail: scipy gives NaN for it at large nc, where it is ~0
    return upper + (lower if math.isfinite(lower) else 0.0)


def standardized_mde(n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """The standardized effect (mean / sd of the differences) detected with `power` at `alpha`."""
    if n < 2:
        raise ValueError(f"a minimum detectable effect needs at least 2 users, got {n}")
    if not 0.0 < alpha < power < 1.0:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    normal = (sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(power)) / math.sqrt(n)
    hi = 2.0 * normal + 1.0
    while t_test_power(hi, n, alpha) < power:  # tiny n: the t tails are heavy, widen the bracket
        hi *= 2.0
    return float(optimize.brentq(lambda e: t_test_power(e, n, alpha) - power, 0.0, hi, xtol=1e-12, rtol=1e-12))


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """MDE in the metric's own units: standardized_mde(n, alpha, power) * sd; NaN with fewer than 2 users."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return standardized_mde(n, alpha, power) * float(sd)
