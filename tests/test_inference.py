"""The paired statistics of compare (rnnlab.inference) on synthetic data with a known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from rnnlab import inference
from rnnlab.inference import Scores

SETTINGS = {"confidence": 0.95, "alpha": 0.05, "resamples": 2000, "seed": 0}


def classifier_scores(rng: np.random.Generator, accuracy: float, seeds: int, units: int, easy: np.ndarray) -> Scores:
    """0/1 scores: each seed gets a unit right with probability that rises with the unit's easiness (shared by models)."""
    p = np.clip(accuracy + 0.3 * (easy - easy.mean()), 0, 1)
    values = (rng.random((seeds, units)) < p).astype(float)
    return Scores(values, np.ones(units), np.arange(units) // 4, tuple(range(seeds)), True)


def test_unit_scores_are_the_primary_metric_per_unit() -> None:
    classified = pd.DataFrame({"unit": [3, 1, 2], "group": ["a", "a", "b"], "target": [1, 0, 1], "prediction": [1, 1, 1]})
    scored = inference.unit_scores(classified, "test_acc")
    assert scored["score"].tolist() == [1.0, 0.0, 1.0] and scored["unit"].tolist() == [3, 1, 2]
    summed = pd.DataFrame({"unit": [0, 1], "group": [0, 1], "target": [1.5, 0.25], "prediction": [1.25, 0.25], "loss": [9.0, 9.0]})
    scored = inference.unit_scores(summed, "test_mse")  # the adding problem: each sequence's squared error, not its loss column
    assert scored["score"].tolist() == [0.0625, 0.0] and scored["weight"].tolist() == [1.0, 1.0]
    text = pd.DataFrame({"unit": [0, 100], "group": ["w", "w"], "loss": [1.5, 2.0], "characters": [100, 50]})
    scored = inference.unit_scores(text, "test_loss")
    assert np.average(scored["score"], weights=scored["weight"]) == pytest.approx((150 + 100) / 150)
    forecast = pd.DataFrame(
        {"unit": ["t0", "t0", "t1", "t1"], "group": [0, 0, 0, 0], "horizon": [1, 2, 1, 2], "target": [1.0, 2, 3, 4]}
        | {"prediction": [2.0, 2, 3, 6]}
    )
    assert inference.unit_scores(forecast, "test_mase", scale=0.5)["score"].tolist() == [1.0, 2.0]  # (|1| + 0) / 2 / 0.5
    assert inference.unit_scores(forecast, "test_mase")["score"].tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="no per-unit form of test_f1"):
        inference.unit_scores(classified, "test_f1")


def test_independent_units_get_the_clustered_paired_t_and_others_a_hac_t() -> None:
    rng = np.random.default_rng(3)
    errors = rng.random((2, 60))
    first, second = (
        Scores(values, np.ones(60), np.arange(60), (0, 1), "test_mse" in inference.INDEPENDENT_UNITS) for values in (errors, 0.9 * errors)
    )
    assert inference.paired_test(first, second)[0] == inference.CLUSTERED
    text = [Scores(s.values, s.weights, s.groups, s.seeds, False) for s in (first, second)]
    assert inference.paired_test(*text)[0] == inference.HAC


def test_a_real_difference_is_found() -> None:
    rng = np.random.default_rng(1)
    easy = rng.random(2000)
    better, worse = (classifier_scores(rng, accuracy, 5, 2000, easy) for accuracy in (0.88, 0.84))
    pair = inference.compare_pair(better, worse, margin=0.01, **SETTINGS)
    pair["p_holm"] = pair["p_value"]
    assert pair["effect"] == pytest.approx(0.04, abs=0.01) and pair["ci"][0] > 0 and pair["p_value"] < 0.01
    assert inference.verdict(pair, "a", "b", "max", 0.05) == "a better"
    assert inference.verdict(pair, "a", "b", "min", 0.05) == "b better"  # for a loss, the higher score is the worse model


def test_identical_models_are_equivalent() -> None:
    rng = np.random.default_rng(2)
    scores = classifier_scores(rng, 0.85, 5, 2000, rng.random(2000))
    pair = inference.compare_pair(scores, scores, margin=0.01, **SETTINGS)
    pair["p_holm"] = pair["p_value"]
    assert pair["effect"] == 0 and pair["equivalent"] and pair["p_value"] == 1.0
    assert inference.verdict(pair, "a", "b", "max", 0.05) == "equivalent within ±0.01"


def test_a_small_sample_is_inconclusive() -> None:
    rng = np.random.default_rng(3)
    easy = rng.random(200)
    first, second = (classifier_scores(rng, 0.85, 3, 200, easy) for _ in range(2))
    pair = inference.compare_pair(first, second, margin=0.01, **SETTINGS)
    pair["p_holm"] = pair["p_value"]
    assert inference.verdict(pair, "a", "b", "max", 0.05) == "inconclusive"
    assert pair["mde"] > 0.01  # this design cannot see an effect the size of the margin


@pytest.mark.parametrize("kind", ["clustered", "diebold-mariano"])
def test_false_positive_rate_under_the_null_is_near_alpha(kind: str) -> None:
    """Two models with the same accuracy (classifier, units in groups of four) or the same expected error (forecast,
    errors correlated over three overlapping steps ahead, Diebold-Mariano): over 400 synthetic nulls the tests reject
    at about 5%."""
    rng = np.random.default_rng(4)
    rejected = 0
    for _ in range(400):
        if kind == "clustered":
            easy = rng.random(300)
            first, second = (classifier_scores(rng, 0.8, 3, 300, easy) for _ in range(2))
            horizon = None
        else:
            shocks = rng.normal(size=(2, 3, 202))
            moving = shocks[..., 2:] + shocks[..., 1:-1] + shocks[..., :-2]  # MA(2): what horizon-3 forecasts share
            first, second = (Scores(1 + 0.2 * m, np.ones(200), np.arange(200) // 3, (0, 1, 2), False) for m in moving)
            horizon = 3
        rejected += inference.paired_test(first, second, horizon)[1] < 0.05
    assert 0.02 <= rejected / 400 <= 0.09


def test_the_classifier_test_clusters_units_that_share_a_group() -> None:
    """Units of one group (a held-out voice) that are all easier for one model: as one piece of evidence per group,
    not 50 independent ones; and the test answers for the mean model, which an ensemble vote would not."""
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(8), 50)
    voice_effect = np.repeat(rng.normal(0, 0.2, 8), 50)  # some voices suit the first model, some the second
    first = Scores((rng.random((3, 400)) < 0.8 + voice_effect).astype(float), np.ones(400), groups, (0, 1, 2), True)
    second = Scores((rng.random((3, 400)) < 0.8).astype(float), np.ones(400), groups, (0, 1, 2), True)
    test, p_clustered = inference.paired_test(first, second)
    independent = Scores(second.values, second.weights, np.arange(400), second.seeds, True)
    _, p_independent = inference.paired_test(Scores(first.values, first.weights, np.arange(400), first.seeds, True), independent)
    differences = first.values.mean(axis=0) - second.values.mean(axis=0)
    assert test == "paired t (clustered)"
    assert p_independent == pytest.approx(stats.ttest_1samp(differences, 0).pvalue)  # one unit per group: the classical t
    means = pd.Series(differences).groupby(groups).mean()  # equal group sizes: the t-test of the group means, G - 1 = 7 df
    assert p_clustered == pytest.approx(stats.ttest_1samp(means, 0).pvalue, rel=1e-6)
    assert p_clustered > p_independent


def test_bootstrap_interval_covers_a_null_effect_with_seed_noise() -> None:
    """Per-seed shifts (seed-to-seed variation) and per-unit noise: the two-level interval covers 0 about 95% of the time."""
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(200):
        differences = rng.normal(0, 0.02, size=(5, 1)) + rng.normal(0, 0.3, size=(5, 400))
        draws = inference.bootstrap(differences, np.ones(400), np.arange(400) // 8, 500, 0)
        low, high = np.quantile(draws, [0.025, 0.975])
        covered += low <= 0 <= high
    assert 0.88 <= covered / 200 <= 0.99  # about 95%: neither too narrow nor double-counting the unit noise


def test_more_seeds_halve_the_mde_only_where_seeds_are_the_noise() -> None:
    rng = np.random.default_rng(6)
    seed_noise = rng.normal(0, 0.05, size=(4, 1)) + rng.normal(0, 0.01, size=(4, 2000))
    se = inference.bootstrap(seed_noise, np.ones(2000), np.arange(2000), 2000, 0).std(ddof=1)
    needed = inference.seeds_to_halve(seed_noise, np.ones(2000), np.arange(2000), 2000, 0, se)
    assert needed is not None and 12 <= needed <= 20  # about four times the seeds: variance falls as 1 / seeds
    unit_noise = rng.normal(0, 0.001, size=(4, 1)) + rng.normal(0, 1, size=(1, 200))  # the same hard units for every seed
    se = inference.bootstrap(unit_noise, np.ones(200), np.arange(200), 2000, 0).std(ddof=1)
    assert inference.seeds_to_halve(unit_noise, np.ones(200), np.arange(200), 2000, 0, se) is None  # the test set limits it


def test_groups_are_resampled_whole() -> None:
    """Units that move together (one group) give a wider interval than the same units taken as independent."""
    rng = np.random.default_rng(7)
    shared = np.repeat(rng.normal(0, 1, size=20), 10)[None, :] + rng.normal(0, 0.1, size=(3, 200))
    grouped = inference.bootstrap(shared, np.ones(200), np.arange(200) // 10, 2000, 0).std()
    independent = inference.bootstrap(shared, np.ones(200), np.arange(200), 2000, 0).std()
    assert grouped > 2 * independent


def test_text_losses_are_tested_with_weighted_newey_west_variance() -> None:
    """Chunk rows of unequal length: the test's mean is the weighted (per-character) mean, and its variance is Newey and
    West's with Bartlett weights at their rule's lag (3 for 50 units), computed here by hand."""
    rng = np.random.default_rng(8)
    weights = np.where(np.arange(50) % 10 == 9, 40.0, 100.0)  # every tenth row a short last chunk
    a, b = rng.normal(1.50, 0.1, size=(2, 50)), rng.normal(1.48, 0.1, size=(2, 50))
    first, second = (Scores(v, weights, np.arange(50) // 10, (0, 1), False) for v in (a, b))
    test, p_value = inference.paired_test(first, second)
    d = (a.mean(axis=0) - b.mean(axis=0)) * weights / weights.mean()
    e, lags = d - d.mean(), 3
    autocovariances = [np.sum(e[j:] * e[: len(e) - j]) / len(e) for j in range(lags + 1)]
    long_run = autocovariances[0] + 2 * sum((1 - j / (lags + 1)) * autocovariances[j] for j in range(1, lags + 1))
    t = d.mean() / np.sqrt(long_run / len(d))
    assert test == "HAC t (Newey-West)" and p_value == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1), rel=1e-6)


def test_equal_scores_are_not_a_difference() -> None:
    scores = np.full((2, 30), 0.7)
    first = Scores(scores, np.ones(30), np.arange(30), (0, 1), False)
    second = Scores(scores + 1e-12, np.ones(30), np.arange(30), (0, 1), False)  # rounding, not a difference
    assert inference.paired_test(first, second)[1] == 1.0 and inference.paired_test(first, second, horizon=3)[1] == 1.0


def test_holm_is_statsmodels_step_down() -> None:
    p_values = [0.01, 0.04, 0.03, 0.2]
    assert inference.holm(p_values) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert inference.holm(p_values) == pytest.approx(list(multipletests(p_values, method="holm")[1]))
    assert inference.holm([]) == []


def test_newey_west_lags() -> None:
    assert inference.newey_west_lags(100) == 4 and inference.newey_west_lags(1000) == 6
