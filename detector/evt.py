"""False-alarm rates from the tail of normal scores: peaks over threshold (POT) with a generalised Pareto
distribution (GPD), as in SPOT (Siffer et al., KDD 2017), and the extremal index of a correlated stream.

What an operator counts is alerts per camera-hour, not frames above a threshold. Two facts connect them:

* The tail. Beyond an initial threshold `u` (a high quantile of the normal scores), the excesses
  `x - u` of any continuous score follow a GPD (Pickands-Balkema-de Haan): P(X > u + y | X > u) =
  (1 + xi y / sigma)^(-1/xi). The score exceeded with probability p per frame is then
  z_p = u + sigma / xi * ((p n / N_u)^(-xi) - 1)  (u - sigma log(p n / N_u) as xi -> 0),
  with n scores of which N_u exceed u. No shape is assumed for the bulk of the scores, unlike a normal
  fit (framescore.tail_threshold), which under-estimates heavy tails.
* Clustering. Neighbouring frames of a video score alike, so exceedances come in runs and one alert
  spans a run. The extremal index theta (runs estimator: clusters of exceedances separated by more than
  `run` frames, divided by exceedances) turns a per-frame exceedance probability into a rate of
  clusters: alarms per hour = theta * p * frames per hour.

`PotModel.fit(scores)` fits both on held-out normal scores; `threshold_for_rate` inverts the rate;
`predicted_rate` gives the alarms per hour a threshold is expected to raise. `StreamingPot` keeps the
model up to date from live scores that raised no alarm (SPOT's update), with bounded memory.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

#: Fewer excesses than this and the GPD's shape is not estimable: the fit falls back to an exponential
#: tail (xi = 0, sigma = mean excess), which is the GPD's maximum-likelihood fit with the shape fixed.
MIN_EXCESSES_FOR_SHAPE = 20


def extremal_index(exceed: np.ndarray, run: int) -> float:
    """Runs estimator of the extremal index: clusters / exceedances, where a cluster ends after more
    than `run` consecutive frames below the threshold. 1.0 for independent exceedances, 1 / (mean
    cluster length) for runs; 1.0 when nothing exceeds."""
    idx = np.flatnonzero(np.asarray(exceed, dtype=bool))
    if len(idx) == 0:
        return 1.0
    clusters = 1 + int(np.count_nonzero(np.diff(idx) > run))
    return clusters / len(idx)


def fit_gpd(excesses: np.ndarray) -> tuple[float, float]:
    """(xi, sigma) of a GPD fitted by maximum likelihood to positive excesses (location 0).

    Shape bounded to [-0.5, 0.5]: outside it the likelihood is irregular (xi < -0.5) or the tail so
    heavy that its mean is barely defined, and a few hundred normal scores cannot tell either apart
    from a bounded estimate."""
    y = np.asarray(excesses, dtype=np.float64)
    y = y[y > 0]
    if len(y) == 0:
        return 0.0, 1e-12
    mean = float(y.mean())
    if len(y) < MIN_EXCESSES_FOR_SHAPE:
        return 0.0, max(mean, 1e-12)
    from scipy.stats import genpareto

    xi, _, sigma = genpareto.fit(y, floc=0.0)
    if not (math.isfinite(xi) and math.isfinite(sigma) and sigma > 0):
        return 0.0, max(mean, 1e-12)
    clipped = float(np.clip(xi, -0.5, 0.5))
    if clipped != xi:  # the scale for the clipped shape, by the moment match E[Y] = sigma / (1 - xi)
        return clipped, max(mean * (1.0 - clipped), 1e-12)
    return float(xi), float(sigma)


@dataclass(frozen=True)
class PotModel:
    """A fitted tail: initial threshold `u`, GPD shape `xi` and scale `sigma` of the excesses over it,
    the fraction of scores above `u` (`tail_fraction` = N_u / n), the extremal index `theta` and the
    frame rate the rates refer to."""

    u: float
    xi: float
    sigma: float
    tail_fraction: float
    theta: float
    fps: float
    n: int

    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        fps: float,
        init_quantile: float = 0.9,
        run: int | None = None,
        theta: float | None = None,
    ) -> PotModel:
        """Fit on normal scores in time order (one stream, or streams concatenated: a join adds at most
        one spurious cluster). `run`: frames below u that end a cluster (default: one second of frames).
        `theta` overrides the estimated extremal index (1.0 treats frames as independent)."""
        x = np.asarray(scores, dtype=np.float64)
        x = x[np.isfinite(x)]
        if len(x) < 2:
            raise ValueError(f"need at least 2 finite normal scores to fit a tail, got {len(x)}")
        if not 0.0 < init_quantile < 1.0:
            raise ValueError(f"init_quantile must be in (0, 1), got {init_quantile}")
        u = float(np.quantile(x, init_quantile))
        above = x > u
        if not above.any():  # constant scores: nothing above any quantile
            return cls(u, 0.0, 1e-12, 1.0 / len(x), 1.0, float(fps), len(x))
        xi, sigma = fit_gpd(x[above] - u)
        run = max(1, int(round(fps))) if run is None else int(run)
        th = extremal_index(above, run) if theta is None else float(theta)
        return cls(u, xi, sigma, float(above.mean()), th, float(fps), len(x))

    def exceedance(self, threshold: float) -> float:
        """P(score > threshold) for one frame, from the fitted tail (the empirical fraction below u is
        not modelled: thresholds under u get tail_fraction or more, clipped to 1)."""
        y = float(threshold) - self.u
        if y <= 0:
            return min(1.0, self.tail_fraction)
        if self.xi == 0.0:
            survival = math.exp(-y / self.sigma)
        else:
            base = 1.0 + self.xi * y / self.sigma
            survival = 0.0 if base <= 0 else base ** (-1.0 / self.xi)
        return self.tail_fraction * survival

    def threshold_for_probability(self, p: float) -> float:
        """The score exceeded with probability `p` per frame (p below the tail fraction)."""
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must be in (0, 1), got {p}")
        r = p / self.tail_fraction
        if r >= 1.0:
            return self.u
        if self.xi == 0.0:
            return self.u - self.sigma * math.log(r)
        return self.u + self.sigma / self.xi * (r ** (-self.xi) - 1.0)

    def threshold_for_rate(self, alarms_per_hour: float) -> float:
        """The threshold expected to raise `alarms_per_hour` clusters of exceedances per hour."""
        frames_per_hour = 3600.0 * max(self.fps, 1e-9)
        p = alarms_per_hour / (frames_per_hour * max(self.theta, 1e-9))
        return self.threshold_for_probability(min(p, 0.999999))

    def predicted_rate(self, threshold: float) -> float:
        """Alarms (clusters of exceedances) per hour expected at `threshold`."""
        return self.theta * self.exceedance(threshold) * 3600.0 * self.fps


def count_alarms(scores: np.ndarray, threshold: float, run: int, inclusive: bool = False) -> int:
    """Clusters of exceedances of `threshold` in one stream of scores (the measured counterpart of
    PotModel.predicted_rate): a cluster ends after more than `run` frames below the threshold.
    `inclusive`: a score equal to the threshold counts (the alert tracker's `>=`)."""
    x = np.asarray(scores, dtype=np.float64)
    idx = np.flatnonzero(x >= threshold if inclusive else x > threshold)
    if len(idx) == 0:
        return 0
    return 1 + int(np.count_nonzero(np.diff(idx) > run))


class StreamingPot:
    """SPOT's online update: the tail model refitted from live normal scores.

    Scores at or above the alarm threshold are not learnt from (they may be anomalies); every other
    score above `u` adds an excess. The most recent `max_excesses` excesses and the count of scores seen
    are kept (bounded memory); the GPD is refitted every `refit_every` new excesses, and the alarm
    threshold recomputed for the target rate. `theta` stays the fitted one: clustering is a property of
    the camera's frame rate and scene dynamics, which live normal scores below u do not re-estimate well.
    """

    def __init__(self, model: PotModel, alarms_per_hour: float, max_excesses: int = 5000, refit_every: int = 100):
        self.model = model
        self.alarms_per_hour = float(alarms_per_hour)
        self.threshold = model.threshold_for_rate(alarms_per_hour)
        n_tail = max(1, int(round(model.tail_fraction * model.n)))
        # the initial excesses are not stored in the model: seed with its quantiles (same distribution)
        q = (np.arange(n_tail) + 0.5) / n_tail
        seed = PotModel(model.u, model.xi, model.sigma, 1.0, 1.0, model.fps, n_tail)
        self._excesses: deque[float] = deque(
            (seed.threshold_for_probability(float(1 - qi)) - model.u for qi in q), maxlen=max_excesses
        )
        self._seen = model.n
        self._above = n_tail
        self._new = 0
        self.refit_every = int(refit_every)

    def update(self, score: float) -> float:
        """Learn from one live score; returns the alarm threshold in force."""
        s = float(score)
        if not math.isfinite(s) or s >= self.threshold:
            return self.threshold
        self._seen += 1
        if s > self.model.u:
            self._above += 1
            self._excesses.append(s - self.model.u)
            self._new += 1
            if self._new >= self.refit_every:
                self._refit()
        return self.threshold

    def _refit(self) -> None:
        self._new = 0
        xi, sigma = fit_gpd(np.fromiter(self._excesses, dtype=np.float64))
        m = self.model
        self.model = PotModel(m.u, xi, sigma, self._above / self._seen, m.theta, m.fps, self._seen)
        self.threshold = self.model.threshold_for_rate(self.alarms_per_hour)
