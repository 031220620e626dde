"""The forecast task's statistical baselines against hand-computed cases and the libraries' own forecasts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from statsmodels.tsa.holtwinters import ExponentialSmoothing
from statsmodels.tsa.stattools import acf

from rnnlab.baselines.forecast import (
    ETS_OPTIMISERS,
    arima_forecasts,
    auto_arima_order,
    baseline_forecasts,
    ets_forecasts,
    is_seasonal,
    naive2_forecasts,
    persistence_forecasts,
)
from rnnlab.errors import ConfigError

PATTERN = np.array([0.5, 1.0, 1.5, 1.0])  # multiplicative seasonal indices of period 4, mean 1


def seasonal_series(n: int = 80, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 10 * np.tile(PATTERN, n // 4) * (1 + noise * rng.normal(size=n))


def test_m4_seasonality_test_by_hand() -> None:
    series = seasonal_series(noise=0.05)
    r = acf(series, nlags=4)[1:]
    limit = 1.645 * np.sqrt((1 + 2 * (r[0] ** 2 + r[1] ** 2 + r[2] ** 2)) / len(series))
    assert abs(r[3]) > limit and is_seasonal(series, 4)
    assert not is_seasonal(np.random.default_rng(1).normal(size=200), 4)  # white noise
    assert not is_seasonal(series, 1) and not is_seasonal(series[:11], 4)  # period 1; under three periods of history


def test_naive2_rescales_the_last_deseasonalised_value() -> None:
    series = seasonal_series()
    series[60:] *= 2  # the level doubles after training: Naive2 follows the last value, at each target's phase
    origins, horizon = np.array([61, 66, 70]), 5
    forecasts, info = naive2_forecasts(series, 60, origins, horizon, 4)
    assert info == {"seasonal": True, "period": 4, "decomposition": "multiplicative"}
    assert forecasts == pytest.approx(np.stack([series[o : o + horizon] for o in origins]))
    assert not np.allclose(forecasts, persistence_forecasts(series, origins, horizon))
    noise = np.random.default_rng(2).normal(size=100)
    assert naive2_forecasts(noise, 60, origins, horizon, 4)[0] == pytest.approx(persistence_forecasts(noise, origins, horizon))
    shifted = seasonal_series() - 10  # values <= 0: an additive decomposition
    assert naive2_forecasts(shifted, 60, origins, horizon, 4)[1]["decomposition"] == "additive"


def test_ets_forecasts_equal_statsmodels_refitted_with_fixed_parameters_at_each_origin() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(300)
    series = 10 + 0.02 * t + 2 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.5, 300)
    origins, horizon = np.array([200, 230, 295]), 5
    forecasts, info = ets_forecasts(series, 200, origins, horizon, 12)
    assert info["seasonal"] == 12  # the seasonal form wins on AICc
    shape = {"trend": "add" if info["trend"] else None, "damped_trend": bool(info["trend"]), "seasonal": "add", "seasonal_periods": 12}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ExponentialSmoothing(series[:200], initialization_method="estimated", **shape)
        fitted = min((model.fit(method=method) for method in ETS_OPTIMISERS), key=lambda fit: fit.aicc)
        p = fitted.params
        known = {"initial_level": p["initial_level"], "initial_seasonal": p["initial_seasons"]}
        known["initial_trend"] = p["initial_trend"] if info["trend"] else None
        smoothing = {key: p[key] for key in ("smoothing_level", "smoothing_trend", "smoothing_seasonal", "damping_trend")}
        smoothing = {key: value for key, value in smoothing.items() if value is not None and not np.isnan(value)}
        for row, origin in enumerate(origins):
            own = ExponentialSmoothing(series[:origin], initialization_method="known", **shape, **known).fit(optimized=False, **smoothing)
            assert forecasts[row] == pytest.approx(own.forecast(horizon), abs=1e-8)
    assert ets_forecasts(series, 200, np.array([200]), 3, 12)[0][0] == pytest.approx(fitted.forecast(3), abs=1e-8)
    assert ets_forecasts(series, 200, origins, horizon, 1)[1]["seasonal"] is None  # period 1: never seasonal


@pytest.mark.slow
def test_ets_keeps_the_optimiser_with_the_lowest_aicc() -> None:
    """The electricity task's train rows (its first 2,822 half-hours): statsmodels' default optimiser, L-BFGS-B, stopped
    at AICc 31,338 here (31,232 with other CPU kernels), least squares at 30,878-30,879."""
    from pmdarima.datasets import load_taylor

    series = np.asarray(load_taylor(), dtype=np.float64)
    shape = {"trend": "add", "damped_trend": True, "seasonal": "add", "seasonal_periods": 48}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ExponentialSmoothing(series[:2822], initialization_method="estimated", **shape)
        aicc = {method: model.fit(method=method).aicc for method in ETS_OPTIMISERS}
    _, info = ets_forecasts(series, 2822, np.array([2822]), 1, 48)
    assert info["trend"] == "additive damped" and info["seasonal"] == 48
    # As good as the best of the three, within the 1 AICc by which their optima move with BLAS threads (one here).
    assert info["aicc"] < min(aicc.values()) + 5


def test_automatic_arima_selects_on_train_and_forecasts_with_the_selected_order() -> None:
    rng = np.random.default_rng(3)
    series = np.zeros(240)
    for t in range(1, 240):
        series[t] = 0.8 * series[t - 1] + rng.normal()
    series += 5
    order, trend = auto_arima_order(series[:180], None, max_order=3)
    assert order[1] == 0 and 1 <= order[0] <= 3 and trend == "c"  # stationary AR(1) around 5: no differencing, a constant
    origins = np.arange(180, 236)
    automatic, info = arima_forecasts(series, None, 180, origins, 4, order="auto")
    fixed, _ = arima_forecasts(series, None, 180, origins, 4, order=order, trend=trend)
    assert info["order"] == order and info["trend"] == trend and automatic == pytest.approx(fixed)
    with pytest.raises(ConfigError, match="auto or"):
        arima_forecasts(series, None, 180, origins, 4, order="best")


@pytest.mark.parametrize("max_order", [0, 1])
def test_automatic_arima_keeps_within_a_bound_below_its_stepwise_start(max_order: int) -> None:
    series = 5 + np.cumsum(np.random.default_rng(4).normal(size=200)) * 0.1
    order, _ = auto_arima_order(series, None, max_order=max_order)
    assert order[0] <= max_order and order[2] <= max_order


@pytest.mark.parametrize("max_order", [-1, 1.5, True])
def test_automatic_arima_refuses_a_bound_that_is_not_a_count(max_order: object) -> None:
    with pytest.raises(ConfigError, match="max_order must be an integer >= 0"):
        auto_arima_order(np.arange(50.0), None, max_order=max_order)


def test_every_baseline_is_named_in_report_order() -> None:
    series = seasonal_series(200, noise=0.05)
    origins = np.arange(150, 197)
    arima = {"order": [1, 0, 0], "trend": "c"}
    forecasts, info = baseline_forecasts(series, None, 120, origins, 4, 4, seasonal_periods=[4, 8], arima=arima)
    assert list(forecasts) == ["persistence", "seasonal_naive_4", "seasonal_naive_8", "naive2", "arima", "ets"]
    assert all(values.shape == (len(origins), 4) for values in forecasts.values())
    assert forecasts["seasonal_naive_8"][:, 0] == pytest.approx(series[origins - 8])
    assert set(info) == {"naive2", "arima", "ets"}
    with pytest.raises(ConfigError, match="seasonal_periods"):
        baseline_forecasts(series, None, 120, origins, 4, 4, seasonal_periods=[1])
