"""Score a logged model the MLflow way, so the UI shows what people look for on a model page.

`evaluate_logged_model` predicts once through the served pyfunc, then hands the predictions to
`mlflow.models.evaluate` (regressor) as a static dataset: MLflow computes its own regression
metrics plus every psamf.metrics convention (`psamf/<key>`), logs the evaluation table and our
predicted-vs-true and residual plots, logs the dataset as the run's input, and links every
metric to the LoggedModel (`model_id`). The registry gate reads the numbers returned here, which
are the same `regression_metrics` values the custom metrics log.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from psamf.metrics import CONVENTIONS, regression_metrics

# Conventions MLflow's regressor evaluation already logs under its own name: logged once, there.
BUILTIN = {"mae": "mean_absolute_error"}


def convention_metrics() -> list:
    """MLflow metrics: `psamf/<key>` for every psamf.metrics convention MLflow does not log itself
    (BUILTIN: MAE is `mean_absolute_error`), and per-segment `abs_error`."""
    from mlflow.metrics import MetricValue
    from mlflow.models import make_metric

    def conventions(predictions: pd.Series, targets: pd.Series, metrics=None) -> MetricValue:
        return MetricValue(aggregate_results={k: v for k, v in regression_metrics(predictions, targets).items()
                                              if k not in BUILTIN})

    def abs_error(predictions: pd.Series, targets: pd.Series, metrics=None) -> MetricValue:
        # Per-row scores are what make MLflow log the evaluation table (one row per segment).
        err = np.abs(np.asarray(predictions, float) - np.asarray(targets, float))
        # no "mean": that is MAE, logged once as mean_absolute_error
        return MetricValue(scores=err.tolist(), aggregate_results={"max": float(err.max())})

    # greater_is_better describes the headline, MAE; the other keys are read by their conventions.
    return [make_metric(eval_fn=conventions, greater_is_better=False, name="psamf",
                        long_name="psamf.metrics conventions: " + ", ".join(CONVENTIONS)),
            make_metric(eval_fn=abs_error, greater_is_better=False, name="abs_error")]


def _plots(eval_df: pd.DataFrame, _builtin: dict, artifacts_dir: str) -> dict[str, str]:
    """Predicted vs true (with y = x) and residuals vs predicted + their histogram, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from psamf.reports.html import save_figure

    p, t = eval_df["prediction"].to_numpy(float), eval_df["target"].to_numpy(float)
    out = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(t, p, s=10, alpha=0.6)
    lim = [min(t.min(), p.min(), -3), max(t.max(), p.max(), 3)]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlabel="true sentiment", ylabel="predicted", title="Predicted vs true (test)")
    out["predicted_vs_true"] = str(save_figure(fig, Path(artifacts_dir) / "predicted_vs_true.png"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    a1.scatter(p, p - t, s=10, alpha=0.6)
    a1.axhline(0, color="k", lw=1)
    a1.set(xlabel="predicted", ylabel="residual (pred - true)", title="Residuals vs predicted")
    a2.hist(p - t, bins=30)
    a2.set(xlabel="residual", title="Residual distribution")
    out["residuals"] = str(save_figure(fig, Path(artifacts_dir) / "residuals.png"))
    return out


def evaluate_logged_model(model_info, frame: pd.DataFrame, labels: Sequence[float], *, name: str,
                          source: str, digest: str) -> dict[str, float]:
    """Every psamf metric of the logged model on `frame` (its serving input), logged the MLflow
    way into the active run and onto the LoggedModel. Returns the metrics the gate reads."""
    import mlflow

    from psamf.registry.serving import predict_values

    values = predict_values(model_info.model_uri, frame)
    y = np.asarray(labels, dtype=np.float64)
    metrics = regression_metrics(values, y)
    # The evaluation table keeps what a person reads (ids, text, user), not the frame arrays.
    table = pd.DataFrame({"segment_id": list(frame.index), "user_id": frame["user_id"].tolist(),
                          "text": frame["text"].tolist(), "label": y, "prediction": values.astype(np.float64)})
    dataset = mlflow.data.from_pandas(table, source=source, targets="label", predictions="prediction",
                                      name=name, digest=digest[:36])
    mlflow.models.evaluate(data=dataset, model_type="regressor", extra_metrics=convention_metrics(),
                           custom_artifacts=[_plots], model_id=getattr(model_info, "model_id", None),
                           evaluator_config={"log_model_explainability": False})
    return metrics
