"""The forecast tasks' statistical baselines (`statistical_forecasts`): each is fitted on the train rows only (as the
networks are) and then forecasts from every test origin with its parameters fixed, so that all are scored on the
networks' test windows.

- persistence (M4's Naive1): the last observed value;
- seasonal_naive_<p>: the value one period p before each target, for every period of the task (daily and weekly
  for half-hourly electricity);
- naive2 (M4's benchmark for OWA): persistence of the seasonally adjusted series, the seasonal indices of a classical
  multiplicative decomposition, where M4's 90% autocorrelation test finds the series seasonal at its M4 period;
- arima: an ARIMA whose order pmdarima's `auto_arima` selects on the train rows (or a fixed order), with the task's
  Fourier terms as regressors;
- ets: exponential smoothing (statsmodels' Holt-Winters): additive trend (damped) or none, additive seasonality at
  the M4 period or none, the form with the lowest AICc on the train rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from rnnlab.baselines.common import Outputs
from rnnlab.data.base import SplitTensorDataModule
from rnnlab.data.forecast import baseline_inputs, target_windows
from rnnlab.errors import ConfigError, DataError


def persistence_forecasts(target: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """[N, horizon]: the last observed value, repeated."""
    return np.repeat(target[origins - 1, None], horizon, axis=1)


def season_rows(origins: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """[N, horizon] rows: for each target 1..horizon steps after an origin, the row one season before it, taken
    from the last observed season (before the origin) for horizons beyond a season."""
    steps = np.arange(1, horizon + 1)
    return origins[:, None] - 1 + steps - season * np.ceil(steps / season).astype(int)


def seasonal_naive_forecasts(target: np.ndarray, origins: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """[N, horizon]: the value one season before each target, from the last observed season for horizons beyond it."""
    rows = season_rows(origins, horizon, season)
    if rows.min() < 0:
        raise DataError(
            f"The first test forecast needs {season} rows of history before it for the seasonal naive baseline; there are fewer."
        )
    return target[rows]


def is_seasonal(history: np.ndarray, period: int) -> bool:
    """M4's seasonality test: the autocorrelation at lag `period` exceeds its 90% one-sided limit (Bartlett's
    variance from the lower lags). Never seasonal at period 1 or with fewer than three periods of history."""
    if period <= 1 or len(history) < 3 * period:
        return False
    from statsmodels.tsa.stattools import acf

    correlations = acf(history, nlags=period, fft=True)[1:]
    limit = 1.645 * np.sqrt((1 + 2 * np.sum(correlations[: period - 1] ** 2)) / len(history))
    return bool(abs(correlations[period - 1]) > limit)


def seasonal_indices(history: np.ndarray, period: int) -> tuple[np.ndarray, str]:
    """[period] indices of a classical decomposition of `history` by row phase (row r has index r % period), and the
    decomposition: multiplicative as in M4, additive for a series with values <= 0, where no ratio is defined."""
    from statsmodels.tsa.seasonal import seasonal_decompose

    model = "multiplicative" if history.min() > 0 else "additive"
    return np.asarray(seasonal_decompose(history, model=model, period=period).seasonal)[:period], model


def naive2_forecasts(
    target: np.ndarray, train_end: int, origins: np.ndarray, horizon: int, period: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, horizon] M4 Naive2 forecasts: the last value, seasonally adjusted, re-seasonalised at each target's phase;
    the indices come from the train rows. Persistence where the train rows are not seasonal at `period`."""
    history = target[:train_end]
    if not is_seasonal(history, period):
        return persistence_forecasts(target, origins, horizon), {"seasonal": False, "period": period}
    indices, model = seasonal_indices(history, period)
    last, phases = origins - 1, (origins[:, None] - 1 + np.arange(1, horizon + 1)) % period
    if model == "multiplicative":
        forecasts = (target[last] / indices[last % period])[:, None] * indices[phases]
    else:
        forecasts = (target[last] - indices[last % period])[:, None] + indices[phases]
    return forecasts, {"seasonal": True, "period": period, "decomposition": model}


def _at_times(matrix: np.ndarray, times: np.ndarray) -> np.ndarray:
    """A state-space system matrix at the given times: its last axis is time, or of length 1 if time-invariant."""
    return matrix[..., times] if matrix.shape[-1] > 1 else np.repeat(matrix, len(times), axis=-1)


def auto_arima_order(history: np.ndarray, exog: np.ndarray | None, max_order: int) -> tuple[list[int], str | None]:
    """The (p, d, q) that pmdarima's stepwise `auto_arima` selects by AICc on `history` (d by KPSS tests), p and q
    at most `max_order`, and statsmodels' trend term for its intercept: a constant, or a drift when d = 1."""
    import pmdarima

    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 0:
        raise ConfigError(f"task.baselines.arima.max_order must be an integer >= 0, got {max_order!r}.")
    model = pmdarima.auto_arima(
        history,
        X=exog,
        seasonal=False,  # seasonality enters as Fourier regressors: a seasonal ARIMA at period 48 or 365 is too slow
        stepwise=True,
        start_p=min(2, max_order),  # pmdarima's stepwise search starts at (2, d, 2), which must lie within the bound
        start_q=min(2, max_order),
        max_p=max_order,
        max_q=max_order,
        information_criterion="aicc",
        suppress_warnings=True,
        error_action="ignore",
    )
    order = [int(value) for value in model.order]
    trend = {0: "c", 1: "t"}.get(order[1]) if model.with_intercept else None
    return order, trend


def arima_forecasts(
    target: np.ndarray,
    exog: np.ndarray | None,
    train_end: int,
    origins: np.ndarray,
    horizon: int,
    order: Sequence[int] | str = "auto",
    trend: str | None = None,
    max_order: int = 3,
) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, horizon] forecasts of an ARIMA (with `exog` regressors) fitted once on rows [0, train_end); `order="auto"`
    selects (p, d, q) and the trend on those rows (auto_arima_order), a list fixes them.

    The fitted model is run over the whole series with its parameters fixed; the forecasts from
    every origin then follow from the Kalman filter's one-step state predictions, all origins at
    once (the same numbers statsmodels' `forecast` gives from each origin, without refitting).
    """
    # Imported here: statsmodels takes seconds to import and only the baseline stage needs it.
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, EstimationWarning
    from statsmodels.tsa.arima.model import ARIMA

    exog_train = None if exog is None else exog[:train_end]
    with (
        warnings.catch_warnings(),
        threadpool_limits(1),
    ):  # on a busy 2-core machine, BLAS threads made the weather fit take 10 s instead of 0.3 s
        # Non-stationary start parameters and convergence are reported with what was fitted (arima.json's `fitted`).
        warnings.simplefilter("ignore", (EstimationWarning, ConvergenceWarning, UserWarning))
        if order == "auto":
            order, trend = auto_arima_order(target[:train_end], exog_train, max_order)
        elif isinstance(order, str) or len(order) != 3:
            raise ConfigError(f"task.baselines.arima.order must be auto or [p, d, q], got {order!r}.")
        fitted = ARIMA(target[:train_end], exog=exog_train, order=tuple(order), trend=trend).fit()
        states = fitted.apply(target, exog=exog).filter_results
    predicted = states.predicted_state[:, origins]  # state at each origin given the rows before it
    forecasts = np.empty((len(origins), horizon))
    for step in range(horizon):
        times = origins + step
        design, obs_intercept = _at_times(states.design[0], times), _at_times(states.obs_intercept[0], times)
        forecasts[:, step] = np.einsum("kn,kn->n", design, predicted) + obs_intercept
        transition, state_intercept = _at_times(states.transition, times), _at_times(states.state_intercept, times)
        predicted = np.einsum("ijn,jn->in", transition, predicted) + state_intercept
    info = {
        "order": list(order),
        "trend": trend,
        "exog_columns": 0 if exog is None else exog.shape[1],
        "converged": bool(fitted.mle_retvals.get("converged", True)),
        "aic": float(fitted.aic),
    }
    return forecasts, info


# A seasonal ETS likelihood has several optima: on half-hourly electricity statsmodels' default L-BFGS-B stopped about
# 460 AICc above the optimum that Powell's method and least squares reach, and where it stopped depended on the CPU's
# kernels (docs/reliability.md). Each form is fitted by all three; the lowest AICc wins.
ETS_OPTIMISERS = ("L-BFGS-B", "Powell", "least_squares")


def ets_forecasts(target: np.ndarray, train_end: int, origins: np.ndarray, horizon: int, period: int) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, horizon] forecasts of the exponential smoothing form with the lowest AICc on rows [0, train_end) (trend:
    none or additive damped; seasonality: none, or additive at `period` when period > 1), its smoothing parameters
    and initial states fixed, run over the whole series; from origin o, the states after row o - 1."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    forms = [(trend, seasonal) for trend in (None, "add") for seasonal in ((None, "add") if period > 1 else (None,))]
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = {}
        for trend, seasonal in forms:
            shape = {"trend": trend, "damped_trend": trend is not None, "seasonal": seasonal}
            shape["seasonal_periods"] = period if seasonal else None
            model = ExponentialSmoothing(target[:train_end], initialization_method="estimated", **shape)
            fits[trend, seasonal] = (shape, min((model.fit(method=method) for method in ETS_OPTIMISERS), key=lambda fit: fit.aicc))
        shape, best = min(fits.values(), key=lambda fit: fit[1].aicc)
        params = best.params
        known = {
            "initial_level": params["initial_level"],
            "initial_trend": params["initial_trend"] if shape["trend"] else None,
            "initial_seasonal": params["initial_seasons"] if shape["seasonal"] else None,
        }
        smoothing = {key: params[key] for key in ("smoothing_level", "smoothing_trend", "smoothing_seasonal", "damping_trend")}
        smoothing = {key: value for key, value in smoothing.items() if value is not None and not np.isnan(value)}
        whole = ExponentialSmoothing(target, initialization_method="known", **shape, **known).fit(optimized=False, **smoothing)
    last, steps = origins - 1, np.arange(1, horizon + 1)
    forecasts = np.repeat(np.asarray(whole.level)[last, None], horizon, axis=1)
    if shape["trend"]:
        damping = smoothing["damping_trend"]
        forecasts += np.cumsum(damping**steps)[None, :] * np.asarray(whole.trend)[last, None]
    if shape["seasonal"]:
        forecasts += np.asarray(whole.season)[season_rows(origins, horizon, period)]
    info = {"trend": "additive damped" if shape["trend"] else None, "seasonal": period if shape["seasonal"] else None}
    info["aicc"] = float(best.aicc)
    return forecasts, info


def baseline_forecasts(
    target: np.ndarray,
    exog: np.ndarray | None,
    train_end: int,
    origins: np.ndarray,
    horizon: int,
    m4_period: int,
    seasonal_periods: Sequence[int] = (),
    arima: dict[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every baseline's [N, horizon] test forecasts, by name in report order, and what was fitted (its `fitted`)."""
    if any(int(period) <= 1 for period in seasonal_periods):
        raise ConfigError(f"task.baselines.seasonal_periods must be periods > 1 (1 is persistence), got {list(seasonal_periods)}.")
    forecasts = {"persistence": persistence_forecasts(target, origins, horizon)}
    forecasts |= {f"seasonal_naive_{p}": seasonal_naive_forecasts(target, origins, horizon, int(p)) for p in seasonal_periods}
    info: dict[str, Any] = {}
    forecasts["naive2"], info["naive2"] = naive2_forecasts(target, train_end, origins, horizon, m4_period)
    forecasts["arima"], info["arima"] = arima_forecasts(target, exog, train_end, origins, horizon, **(arima or {}))
    forecasts["ets"], info["ets"] = ets_forecasts(target, train_end, origins, horizon, m4_period)
    return forecasts, info


def statistical_forecasts(raw_dir: Path, data: SplitTensorDataModule, seasonal_periods: list[int], arima: dict[str, Any]) -> Outputs:
    """Each statistical forecaster's test outputs (one row per forecast origin and step ahead, as a network's) and
    metrics in the series' units (MASE over the series' scale, as the networks'), on the test origins the networks
    are tested on (task.data.limit_test keeps the oldest); the fitted models' settings go with their metrics."""
    data.setup()
    test = data.datasets["test"]
    inputs = baseline_inputs(raw_dir, data.processed_dir, data.task)
    inputs["origins"] = inputs["origins"][: len(test)]
    forecasts, fitted = baseline_forecasts(**inputs, seasonal_periods=seasonal_periods, arima=arima)
    targets = test.tensors[1].numpy().astype(np.float64)  # the networks' targets, float32 as they read them
    expected = target_windows(inputs["target"], inputs["origins"], inputs["horizon"])
    if targets.shape != expected.shape or not np.allclose(targets, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max()):
        raise DataError(f"{data.processed_dir} does not match the fetched series: rerun the preprocess stage (`dvc repro`).")
    units, horizon = data.test_units(), inputs["horizon"]
    rows = pd.DataFrame(
        {
            "unit": units["unit"].repeat(horizon).to_numpy(),
            "group": units["group"].repeat(horizon).to_numpy(),
            "horizon": np.tile(np.arange(1, horizon + 1), len(units)),
            "target": targets.reshape(-1),
        }
    )
    results = {}
    for name, values in forecasts.items():
        errors = values - targets
        mae = float(np.abs(errors).mean())
        metrics = {"test_mae": mae, "test_rmse": float(np.sqrt((errors**2).mean())), "test_mase": mae / data.metadata["mase_scale"]}
        results[name] = rows.assign(prediction=values.reshape(-1)), metrics | ({"fitted": fitted[name]} if name in fitted else {})
    return results
