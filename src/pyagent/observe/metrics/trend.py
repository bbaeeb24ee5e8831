"""Trend tests and growth patterns of a metric series (RSS samples, latencies, queue depths).

`mann_kendall` answers "is this series trending, and by how much per unit of time?" without
assuming normal noise; `classify` names the shape of a series: stable, linear, exponential,
seasonal, step or sawtooth, with the evidence behind the name.

scipy and statsmodels load on first use, not at import: importing them takes seconds, and the
memory profiler imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from pyagent.errors import PyAgentError

MIN_TREND_POINTS = 4  # below this the Mann-Kendall test cannot reach p < 0.1 (see fewest_points)
MIN_CLASSIFY_POINTS = 8
MAX_POINTS = 2000  # Sen's slope is O(n^2) in memory: longer series are thinned evenly
CLASSIFY_ALPHA = 0.01  # significance a trend needs before `classify` calls it one
TREND_NOISES = 2.0  # ... and its total change over the series, in noise standard deviations
MAD_NORMAL = 1.4826  # MAD of a normal sample times this estimates its standard deviation
LOW_QUARTER_NORMAL = 0.3186  # the 25th percentile of |x| for a standard normal x
DROP_NOISES = 5.0  # a fall this many noise standard deviations (x sqrt 2) deep is a sharp drop
TOOTH_RISE = 2 / 3  # a tooth climbs in rises each at most this share of its fall
STEP_GAIN = 0.5  # a step fit must leave at most this share of the linear fit's squared error
STEP_NOISES = 5.0  # ... and be at least this many noise standard deviations high
SEASONAL_STRENGTH = 0.6  # STL seasonal strength from which a series is seasonal
SEASONAL_ALPHA = 0.001  # ... and the phases' means must differ (one-way ANOVA) at this level
ACF_PEAK = 0.3  # least autocorrelation of a detected period
EXP_MIN_RATE = math.log(2)  # exponential: the slope at least doubles across the series
EXP_ALPHA = 0.001  # F-test of the exponential fit against the linear one

Direction = Literal["increasing", "decreasing", "none"]
Kind = Literal["stable", "linear", "exponential", "seasonal", "step", "sawtooth"]


class TrendError(PyAgentError):
    """A series cannot be analysed as given (mismatched times, duplicate times, NaN)."""


@dataclass(frozen=True)
class Trend:
    """Mann-Kendall test and Sen's slope of a series; slopes are per unit of `times`."""

    n: int
    s: int  # Mann-Kendall S: concordant minus discordant pairs
    var_s: float  # variance of S under no trend, corrected for tied values
    z: float
    p_value: float  # two-sided
    tau: float  # Kendall's tau-b between times and values
    slope: float  # Sen's slope: median of pairwise slopes
    slope_low: float  # confidence interval of the slope at 1 - alpha
    slope_high: float
    intercept: float  # median(values) - slope * median(times)
    alpha: float
    direction: Direction
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Jump:
    """A sharp change: the sample index it lands on and its size (negative for a drop)."""

    index: int
    size: float


@dataclass(frozen=True)
class Pattern:
    """The shape of a series and the evidence `classify` weighed."""

    kind: Kind
    reason: str
    trend: Trend
    noise: float  # robust standard deviation of the noise, from first differences
    r2_linear: float | None = None
    r2_exponential: float | None = None
    growth_rate: float | None = None  # exponential fit: e-folding rate per unit of times
    seasonal_period: int | None = None  # in samples
    seasonal_strength: float | None = None  # STL: 1 - Var(remainder) / Var(seasonal + remainder)
    step_index: int | None = None  # first sample after the step
    step_size: float | None = None
    drops: list[Jump] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _series(values: Sequence[float], times: Sequence[float] | None) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Values and times as float arrays in time order; times default to the sample index."""
    y = np.asarray(values, dtype=float)
    t = np.arange(y.size, dtype=float) if times is None else np.asarray(times, dtype=float)
    if y.ndim != 1 or t.shape != y.shape:
        raise TrendError(f"times ({t.size}) must match values ({y.size}), one-dimensional")
    if not (np.isfinite(y).all() and np.isfinite(t).all()):
        raise TrendError("values and times must be finite (no NaN or infinity)")
    order = np.argsort(t, kind="stable")
    t, y = t[order], y[order]
    if np.any(np.diff(t) == 0):
        raise TrendError("times must be distinct")
    if y.size > MAX_POINTS:
        keep = np.unique(np.linspace(0, y.size - 1, MAX_POINTS).round().astype(int))
        t, y = t[keep], y[keep]
    return y, t


def mann_kendall(values: Sequence[float], times: Sequence[float] | None = None,
                 alpha: float = 0.05) -> Trend:
    """The Mann-Kendall trend test and Sen's slope of `values` observed at `times`.

    S counts concordant minus discordant pairs in time order; its variance under "no trend" is
    n(n-1)(2n+5)/18 less the tie correction sum t(t-1)(2t+5)/18 over groups of t equal values;
    Z = (S - sign(S)) / sqrt(Var S) (continuity-corrected) and the p-value is two-sided normal.
    S comes from Kendall's tau-b (scipy.stats.kendalltau, O(n log n)). Sen's slope, its
    1 - alpha confidence interval and the intercept come from scipy.stats.theilslopes.
    Series longer than MAX_POINTS are thinned evenly first. With fewer than 4 samples, or
    constant values, the direction is "none" and the note says why.
    """
    from scipy import stats

    y, t = _series(values, times)
    n = y.size
    if n >= 2:
        sen = stats.theilslopes(y, t, alpha=1 - alpha)
        slope, intercept, low, high = (float(v) for v in sen)
    else:
        slope = low = high = 0.0
        intercept = float(y[0]) if n else 0.0

    def flat(note: str) -> Trend:
        return Trend(n, 0, 0.0, 0.0, 1.0, 0.0, slope, low, high, intercept, alpha, "none", note)

    if n < MIN_TREND_POINTS:
        return flat(f"{n} samples: too few for a trend test (needs {MIN_TREND_POINTS})")
    if np.ptp(y) == 0:
        return flat("constant series")
    _, ties = np.unique(y, return_counts=True)
    pairs = n * (n - 1) / 2
    tied_pairs = float(np.sum(ties * (ties - 1)) / 2)
    tau = float(stats.kendalltau(t, y).statistic)
    s = round(tau * math.sqrt(pairs * (pairs - tied_pairs)))
    var_s = float(n * (n - 1) * (2 * n + 5) - np.sum(ties * (ties - 1) * (2 * ties + 5))) / 18
    z = (s - np.sign(s)) / math.sqrt(var_s)
    p = float(2 * stats.norm.sf(abs(z)))
    direction: Direction = "none" if p >= alpha else ("increasing" if s > 0 else "decreasing")
    return Trend(n, s, var_s, float(z), p, tau, slope, low, high, intercept, alpha, direction)


def fewest_points(alpha: float) -> int:
    """The fewest samples on which the Mann-Kendall test can find a trend at `alpha`: a strictly
    monotone series of n samples has S = n(n-1)/2, and p = erfc(|Z| / sqrt 2)."""
    if not 0 < alpha < 1:
        raise TrendError(f"alpha must be in (0, 1), got {alpha!r}")
    n = MIN_TREND_POINTS
    while True:
        s = n * (n - 1) / 2
        z = (s - 1) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
        if math.erfc(z / math.sqrt(2)) < alpha:
            return n
        n += 1


def _r2(sse: float, sst: float) -> float:
    return 1.0 - sse / sst if sst > 0 else 1.0


def _residual(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Residual of the least-squares fit y = c + a x."""
    basis = np.column_stack([np.ones_like(x), x])
    return y - basis @ np.linalg.lstsq(basis, y, rcond=None)[0]


def _exponential_fit(y: np.ndarray, tau: np.ndarray) -> tuple[float, float]:
    """(rate b, squared error) of y = c + a (exp(b tau) - 1) / b over tau in [0, 1], b > 0.

    For a fixed b the model is linear in c and a, so the error is profiled over b alone; the
    basis tends to the linear fit as b -> 0, which makes the two fits nested."""
    from scipy import optimize

    def sse(b: float) -> float:
        return float(np.sum(_residual(y, np.expm1(b * tau) / b) ** 2))

    best = optimize.minimize_scalar(sse, bounds=(1e-3, 20.0), method="bounded")
    return float(best.x), float(best.fun)


def _step_fit(y: np.ndarray) -> tuple[int, float, float]:
    """(index, size, squared error) of the best two-level fit: the first index of level two."""
    n = y.size
    k = np.arange(2, n - 1)  # at least two samples each side
    csum, csq = np.cumsum(y), np.cumsum(y * y)
    left = csq[k - 1] - csum[k - 1] ** 2 / k
    right = (csq[-1] - csq[k - 1]) - (csum[-1] - csum[k - 1]) ** 2 / (n - k)
    best = int(np.argmin(left + right))
    index = int(k[best])
    size = float(y[index:].mean() - y[:index].mean())
    return index, size, float(left[best] + right[best])


def _noise(d: np.ndarray) -> float:
    """The noise's standard deviation from first differences d (whose own is sigma*sqrt(2)):
    the smaller of 1.4826 * MAD(d), robust to a trend and to jumps in under half the
    differences, and the 25th percentile of |d| over its normal quantile (0.3186), robust to
    jumps in up to 3/4 of them when the series is level between them (steps with pauses)."""
    mad = float(np.median(np.abs(d - np.median(d)))) * MAD_NORMAL
    low = float(np.quantile(np.abs(d), 0.25)) / LOW_QUARTER_NORMAL
    return min(mad, low) / math.sqrt(2)


def _drops(d: np.ndarray, limit: float) -> list[tuple[int, Jump]]:
    """Sharp falls: runs of consecutive first differences below -limit, merged; each with the
    index of the sample it starts from."""
    out: list[tuple[int, Jump]] = []
    for i in np.flatnonzero(d < -limit):
        if out and out[-1][1].index == i:
            start, jump = out[-1]
            out[-1] = (start, Jump(int(i) + 1, jump.size + float(d[i])))
        else:
            out.append((int(i), Jump(int(i) + 1, float(d[i]))))
    return out


def _teeth(y: np.ndarray, d: np.ndarray, drops: list[tuple[int, Jump]]) -> int:
    """How many drops end a sawtooth's tooth: since the previous drop the series rose by at least
    half the fall, and no single rise on the way was above TOOTH_RISE of the fall (a climb, not
    a jump up and back)."""
    teeth, since = 0, 0
    for start, drop in drops:
        climb = d[since:start]
        if (climb.size and y[start] - y[since] >= -drop.size / 2
                and float(climb.max()) <= -TOOTH_RISE * drop.size):
            teeth += 1
        since = drop.index
    return teeth


def _period(resid: np.ndarray) -> int | None:
    """The first autocorrelation peak of lag >= 2 above ACF_PEAK (and above noise level)."""
    from scipy import signal
    from statsmodels.tsa.stattools import acf

    n = resid.size
    r = acf(resid, nlags=n // 2, fft=True)
    peaks, _ = signal.find_peaks(r, height=max(ACF_PEAK, 2.5 / math.sqrt(n)))
    peaks = peaks[peaks >= 2]
    return int(peaks[0]) if peaks.size else None


def _phases_differ(resid: np.ndarray, period: int) -> bool:
    """Whether the detrended series' mean differs by phase (one-way ANOVA over `t mod period`):
    a clean trend's remainder can look periodic to STL, but its phases share one mean."""
    from scipy import stats

    groups = [resid[phase::period] for phase in range(period)]
    if min(g.size for g in groups) < 2:
        return False
    return bool(stats.f_oneway(*groups).pvalue < SEASONAL_ALPHA)


def _seasonal_strength(y: np.ndarray, period: int) -> float:
    from statsmodels.tsa.seasonal import STL

    fit = STL(y, period=period, robust=True).fit()
    spread = np.var(fit.seasonal + fit.resid)
    return float(max(0.0, 1.0 - np.var(fit.resid) / spread)) if spread > 0 else 0.0


def classify(values: Sequence[float], times: Sequence[float] | None = None,
             period: int | None = None, *, resolution: float = 0.0) -> Pattern:
    """Name the shape of a series. `period` (in samples) is detected when not given;
    `resolution` floors the noise estimate (changes smaller than it are noise, e.g. a page).

    Noise: sigma from the first differences (see `_noise`), robust to trends, jumps and climbs
    in steps.
    Rules, first match wins:
    - stable: fewer than 8 samples, or constant;
    - sawtooth: at least two sharp drops (runs of first differences below -5 sigma*sqrt(2)), at
      least half of them ending a tooth: a climb since the previous drop that won back at least
      half the fall, in rises each at most 2/3 of the fall (gradual, or in steps with pauses);
    - seasonal: a period (given, or the first autocorrelation peak of the linearly detrended
      series at lag >= 2 above 0.3) with at least two cycles, STL (robust) seasonal strength
      1 - Var(remainder)/Var(seasonal + remainder) >= 0.6, and phases whose means differ (a
      one-way ANOVA of the detrended series by `t mod period`, p < 0.001);
    - step: the best two-level fit leaves at most half the squared error of the linear fit and
      less than the exponential fit, and its size is at least 5 sigma;
    - exponential / linear: Mann-Kendall p < 0.01 and the Sen slope's change over the series
      is at least 2 sigma; exponential when y = c + a(exp(b tau) - 1)/b (tau = time scaled to
      [0, 1]) beats the linear fit by an F-test at p < 0.001 and the slope at least doubles
      across the series (b >= ln 2), else linear;
    - stable otherwise.
    """
    from scipy import stats

    if period is not None and period < 2:
        raise TrendError(f"period must be at least 2 samples, got {period}")
    y, t = _series(values, times)
    trend = mann_kendall(y, t)
    n = y.size
    if n < MIN_CLASSIFY_POINTS or np.ptp(y) == 0:
        why = "constant series" if n and np.ptp(y) == 0 else f"{n} samples: too few to classify"
        return Pattern("stable", why, trend, 0.0)
    d = np.diff(y)
    noise = max(_noise(d), resolution)
    drops = _drops(d, DROP_NOISES * noise * math.sqrt(2))
    teeth = _teeth(y, d, drops)
    span = float(t[-1] - t[0])
    tau = (t - t[0]) / span
    sst = float(np.sum((y - y.mean()) ** 2))
    lin_resid = _residual(y, tau)
    sse_lin = float(np.sum(lin_resid**2))
    rate, sse_exp = _exponential_fit(y, tau)
    step_index, step_size, sse_step = _step_fit(y)
    flat = np.ptp(lin_resid) <= 1e-9 * np.ptp(y)  # exactly linear: no autocorrelation to read
    found = period or (None if flat else _period(lin_resid))
    strength = _seasonal_strength(y, found) if found and 2 <= found <= n // 2 else None
    evidence = dict(trend=trend, noise=noise, r2_linear=_r2(sse_lin, sst),
                    r2_exponential=_r2(sse_exp, sst), growth_rate=rate / span,
                    seasonal_period=found, seasonal_strength=strength, step_index=step_index,
                    step_size=step_size, drops=[jump for _, jump in drops])

    if teeth >= 2 and teeth >= len(drops) / 2:
        return Pattern("sawtooth", f"{teeth} sharp drops after climbs", **evidence)
    if strength is not None and strength >= SEASONAL_STRENGTH \
            and _phases_differ(lin_resid, found):
        return Pattern("seasonal", f"period {found} samples, STL strength {strength:.2f}",
                       **evidence)
    if (sse_step <= STEP_GAIN * sse_lin and sse_step < sse_exp
            and abs(step_size) >= STEP_NOISES * noise):
        return Pattern("step", f"level shift of {step_size:.4g} at sample {step_index}",
                       **evidence)
    change = abs(trend.slope) * span
    if trend.p_value < CLASSIFY_ALPHA and change >= TREND_NOISES * noise:
        f_stat = (sse_lin - sse_exp) / (sse_exp / (n - 3)) if sse_exp > 0 else math.inf
        if rate >= EXP_MIN_RATE and stats.f.sf(f_stat, 1, n - 3) < EXP_ALPHA:
            return Pattern("exponential", f"accelerating {trend.direction} trend, slope "
                           f"x{math.exp(rate):.1f} across the series", **evidence)
        return Pattern("linear", f"{trend.direction} trend of {trend.slope:.4g} per unit "
                       f"(p={trend.p_value:.2g})", **evidence)
    return Pattern("stable", f"no significant trend (p={trend.p_value:.2g})", **evidence)
