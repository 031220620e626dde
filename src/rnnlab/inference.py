"""Paired inference between two models on the same test units: effect, interval, test, equivalence, power.

Inputs are per-unit scores of the task's primary metric, [seeds, units] per model, where seed s of one model
was trained with the same random streams as seed s of the other (rnnlab.streams) and unit u is the same test
example for both. The metric must be a weighted mean of unit scores (accuracy, MSE, nats per character, MASE), so
that the effect (mean difference of the metric) is the weighted mean of per-unit differences.

- interval: a two-level bootstrap, seeds (paired) and groups of units (clusters: speakers, works, blocks of
  forecast origins), percentile intervals from `resamples` seeded draws;
- test: a paired t-test of the mean per-unit difference with cluster-robust variance over the groups (classifiers and
  other independent units: the adding problem's sequences),
  Diebold-Mariano with Harvey-Leybourne-Newbold's correction (forecasts), or a t-test of the mean per-chunk
  difference with Newey-West variance (text); each on the units' scores averaged over the shared seeds, so that a
  unit counts once and the test is of the effect the interval estimates;
- equivalence: two one-sided tests at level alpha, as the (1 - 2 alpha) bootstrap interval inside +-margin;
- power: the minimal detectable effect at 80% power, and how many seeds would halve it.

scipy and statsmodels do the tests; the bootstrap is written here because it resamples two levels at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.regression.linear_model import OLS
from statsmodels.stats.multitest import multipletests

POWER = 0.8
CLUSTERED, DIEBOLD_MARIANO, HAC = "paired t (clustered)", "Diebold-Mariano (HLN)", "HAC t (Newey-West)"
# Primary metrics whose test units are independent but for their groups: a classifier's examples, the adding problem's
# sequences (not a forecast's overlapping origins or a text's consecutive chunks). Their paired test is the clustered t.
INDEPENDENT_UNITS = ("test_acc", "test_mse")


@dataclass(frozen=True)
class Scores:
    """One model's per-unit scores on a task: `values` [seeds, units], per-unit `weights` and `groups`, the seeds."""

    values: np.ndarray
    weights: np.ndarray
    groups: np.ndarray
    seeds: tuple[int, ...]
    independent: bool  # units independent but for their groups (INDEPENDENT_UNITS): the clustered paired t


def unit_scores(predictions: pd.DataFrame, metric: str, scale: float = 1.0) -> pd.DataFrame:
    """Per test unit, in test order: `unit`, `group`, `score` (its part of `metric`) and `weight`.

    test_acc: 1 where the prediction is the target; test_mse: the prediction's squared error; test_loss with
    `characters` (text): the chunk row's nats per character, weighted by its characters; test_mase: the unit's mean
    absolute error over its steps ahead divided by `scale` (the series' MASE scale).
    """
    if metric == "test_acc":
        frame = predictions.assign(score=(predictions["prediction"] == predictions["target"]).astype(float), weight=1.0)
    elif metric == "test_mse":
        frame = predictions.assign(score=(predictions["prediction"] - predictions["target"]) ** 2, weight=1.0)
    elif metric == "test_loss" and "characters" in predictions:
        frame = predictions.assign(score=predictions["loss"], weight=predictions["characters"].astype(float))
    elif metric == "test_mase":
        errors = predictions.assign(score=(predictions["prediction"] - predictions["target"]).abs() / scale)
        frame = errors.groupby("unit", sort=False).agg(group=("group", "first"), score=("score", "mean")).reset_index()
        frame = frame.assign(weight=1.0)
    else:
        raise ValueError(f"no per-unit form of {metric} for predictions with columns {list(predictions.columns)}")
    return frame[["unit", "group", "score", "weight"]].reset_index(drop=True)


def _group_sums(differences: np.ndarray, weights: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums of the differences [seeds, units] per group [seeds, G], and the groups' total weights [G]."""
    codes, _ = pd.factorize(groups)
    n_groups = codes.max() + 1
    sums = np.stack([np.bincount(codes, weights=weights * row, minlength=n_groups) for row in differences])
    return sums, np.bincount(codes, weights=weights, minlength=n_groups)


def bootstrap(
    differences: np.ndarray, weights: np.ndarray, groups: np.ndarray, resamples: int, seed: int, seeds: bool = True, units: bool = True
) -> np.ndarray:
    """`resamples` bootstrap values of the weighted mean difference: seeds resampled with replacement (if `seeds`), and
    groups of units with replacement (if `units`), the same draws for both models (they are paired)."""
    sums, totals = _group_sums(differences, weights, groups)
    n_seeds, n_groups = sums.shape
    rng = np.random.default_rng(seed)
    seed_counts = np.ones((resamples, n_seeds))
    if seeds:
        seed_counts = np.stack([np.bincount(rng.integers(n_seeds, size=n_seeds), minlength=n_seeds) for _ in range(resamples)])
    group_counts = np.ones((resamples, n_groups))
    if units:
        group_counts = np.stack([np.bincount(rng.integers(n_groups, size=n_groups), minlength=n_groups) for _ in range(resamples)])
    weighted = np.einsum("bs,sg,bg->b", seed_counts, sums, group_counts)
    return weighted / (n_seeds * (group_counts @ totals))


def paired_test(first: Scores, second: Scores, horizon: int | None = None) -> tuple[str, float]:
    """The test's name and two-sided p-value for first vs second on their shared seeds' mean per-unit scores.

    Classifiers and other independent units (INDEPENDENT_UNITS): the t-test of the mean per-unit difference (each
    unit's score averaged over the seeds) with cluster-robust variance over the units' groups (speakers or voices; a
    review or a sequence of the adding problem is its own group), against Student's
    t with groups - 1 degrees of freedom. Unlike McNemar on majority votes, which earlier releases used, it tests the
    mean single model's accuracy, the effect the interval estimates, rather than the seeds' ensemble's, and it
    respects units that share a voice. Forecasts (`horizon` steps ahead, units in time order): Diebold-Mariano with
    the uniform-kernel variance at lag horizon - 1 (the overlap of consecutive origins' targets) and Harvey, Leybourne
    and Newbold's small-sample correction, against Student's t. Otherwise (units in text order): the t-test of the
    mean difference with Newey-West variance at Newey and West's lag length.
    """
    a, b = first.values.mean(axis=0), second.values.mean(axis=0)
    # Weighted so that the tested mean is the effect's weighted mean (text: chunk rows of unequal length).
    differences = (a - b) * first.weights / first.weights.mean()
    name = CLUSTERED if first.independent and second.independent else DIEBOLD_MARIANO if horizon else HAC
    if np.allclose(differences, 0):
        return name, 1.0
    if np.ptp(differences) == 0:  # the same nonzero difference on every unit: no variance to test against
        return name, 0.0
    n = len(differences)
    if name == CLUSTERED:
        codes, _ = pd.factorize(first.groups)
        fit = OLS(differences, np.ones(n)).fit(cov_type="cluster", cov_kwds={"groups": codes}, use_t=True)
        return name, float(fit.pvalues[0]) if np.isfinite(fit.pvalues[0]) else 1.0
    if horizon:
        t = _hac_t(differences, horizon - 1, "uniform")
        if t is None:  # the uniform kernel's variance can come out negative: Bartlett's cannot
            t = _hac_t(differences, horizon - 1, "bartlett")
        t *= math.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)
        return name, float(2 * stats.t.sf(abs(t), n - 1))
    t = _hac_t(differences, newey_west_lags(n), "bartlett")
    return name, float(2 * stats.t.sf(abs(t), n - 1))


def _hac_t(differences: np.ndarray, lags: int, kernel: str) -> float | None:
    """The t statistic of the mean of `differences` with a HAC (long-run) variance; None where that variance is not positive."""
    fit = OLS(differences, np.ones(len(differences))).fit(cov_type="HAC", cov_kwds={"maxlags": lags, "kernel": kernel})
    se = float(fit.bse[0])
    return float(fit.params[0]) / se if np.isfinite(se) and se > 0 else None


def newey_west_lags(n_units: int) -> int:
    """Newey and West's (1994) rule of thumb for the HAC lag length: floor(4 (n / 100)^(2/9))."""
    return int(4 * (n_units / 100) ** (2 / 9))


def compare_pair(
    first: Scores, second: Scores, margin: float, confidence: float, alpha: float, resamples: int, seed: int, horizon: int | None = None
) -> dict[str, Any]:
    """Effect (first - second) with its `confidence` bootstrap interval, the paired test, equivalence at level `alpha`
    within +-`margin`, and the minimal detectable effect at level `alpha` with 80% power, on the shared seeds."""
    shared = [s for s in first.seeds if s in second.seeds]
    a = first.values[[first.seeds.index(s) for s in shared]]
    b = second.values[[second.seeds.index(s) for s in shared]]
    differences = a - b
    weights, groups = first.weights, first.groups
    effect = float(np.sum(differences.mean(axis=0) * weights) / weights.sum())
    draws = bootstrap(differences, weights, groups, resamples, seed)
    ci = [float(x) for x in np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])]
    tost = [float(x) for x in np.quantile(draws, [alpha, 1 - alpha])]
    paired = (Scores(values, weights, groups, tuple(shared), scores.independent) for values, scores in ((a, first), (b, second)))
    test, p_value = paired_test(*paired, horizon)
    se = float(draws.std(ddof=1))
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)
    return {
        "shared_seeds": shared,
        "effect": effect,
        "ci": ci,
        "equivalence_interval": tost,
        "margin": margin,
        "equivalent": bool(-margin < tost[0] and tost[1] < margin),
        "test": test,
        "p_value": p_value,
        "mde": float(z * se),  # at alpha for this test alone: Holm's correction over the report asks for more
        "groups": len(np.unique(groups)),
        "seeds_to_halve_mde": seeds_to_halve(differences, weights, groups, resamples, seed, se),
    }


def seeds_to_halve(differences: np.ndarray, weights: np.ndarray, groups: np.ndarray, resamples: int, seed: int, se: float) -> int | None:
    """How many seeds would halve the minimal detectable effect (its standard error), with the same test set.

    The variance splits into a seed part, which falls as 1 / seeds, and a test-set part, which more seeds do not
    reduce; None where the test-set part alone exceeds a quarter of today's variance (or one seed gives no seed part).
    """
    n_seeds = len(differences)
    if n_seeds < 2:
        return None
    seed_part = float(bootstrap(differences, weights, groups, resamples, seed, units=False).var(ddof=1))
    unit_part = float(bootstrap(differences, weights, groups, resamples, seed, seeds=False).var(ddof=1))
    room = se**2 / 4 - unit_part
    if room <= 0:
        return None
    return max(n_seeds, math.ceil(n_seeds * seed_part / room))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment over all the tests of a report."""
    if not p_values:
        return []
    return [float(p) for p in multipletests(p_values, method="holm")[1]]


def verdict(pair: dict[str, Any], first: str, second: str, mode: str, alpha: float) -> str:
    """`<model> better` where the Holm-adjusted p is below alpha, `equivalent within +-margin` where the two one-sided
    tests reject, else `inconclusive`."""
    if pair["p_holm"] < alpha and (pair["ci"][0] > 0 or pair["ci"][1] < 0):
        return f"{first if (pair['effect'] > 0) == (mode == 'max') else second} better"
    if pair["equivalent"]:
        return f"equivalent within ±{pair['margin']:g}"
    return "inconclusive"
