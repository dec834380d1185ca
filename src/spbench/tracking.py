"""MLflow tracking for fine-tune runs, never allowed to fail or hang a run.

The run's JSON record is the source of truth; MLflow is a browsable copy. Logging happens
after the record is written, in a worker thread with a deadline: on any error or timeout a
warning is logged and the run still succeeds. A run's identity (its ``run_key``) is stored as
the tag ``spbench.run_key``; logging a key that already has a finished run does nothing, so
a retried job never creates a duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Mapping

__all__ = ["init_experiment", "log_run", "flatten", "RUN_KEY_TAG"]

log = logging.getLogger(__name__)

RUN_KEY_TAG = "spbench.run_key"
#: Outcome columns of the record logged as final metrics.
FINAL_METRICS = (
    "test_accuracy",
    "final_train_loss",
    "source_accuracy",
    "source_accuracy_pretrained",
    "source_accuracy_drop",
    "wall_seconds",
    "images_per_second",
)
TAG_FIELDS = ("penalty", "source", "target", "replicate", "freeze")


def _bound_http_retries() -> None:
    # MLflow's default HTTP policy retries for minutes before raising; a run waits on it.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} (lists as JSON), for MLflow params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def init_experiment(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """Create the tracking store and the experiment once (before jobs fan out: many
    processes opening a fresh SQLite store at once fail). Returns the experiment id."""
    _bound_http_retries()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location)


def _log(uri: str, experiment: str, record: Mapping[str, Any], params: Mapping[str, Any], curve: list[float]) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    key = record["run_key"]
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    for run in found:
        if run.info.status == "FINISHED":
            log.info("MLflow already holds run %s (%s): not logged again", key, run.info.run_id)
            return run.info.run_id
        client.delete_run(run.info.run_id)  # a half-logged earlier attempt
    tags = {RUN_KEY_TAG: key, **{f: str(record[f]) for f in TAG_FIELDS}}
    run = client.create_run(exp_id, run_name=key, tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("train_loss", float(v), now, step) for step, v in enumerate(curve)]
    metrics += [Metric(name, float(record[name]), now, 0) for name in FINAL_METRICS]
    flat = flatten(params)
    params_list = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for i in range(0, len(params_list), 100):
        client.log_batch(run_id, params=params_list[i : i + 100])
    client.log_batch(run_id, tags=[RunTag("spbench.device", str(record["device"]))])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_run(
    uri: str,
    experiment: str,
    record: Mapping[str, Any],
    params: Mapping[str, Any],
    curve: list[float],
    *,
    timeout_s: float = 60.0,
) -> str | None:
    """Log one finished run; returns its MLflow run id, or None if tracking failed or timed
    out (a warning says why). Never raises for tracking trouble."""
    _bound_http_retries()
    result: dict[str, Any] = {}

    def work():
        try:
            result["run_id"] = _log(uri, experiment, record, params, curve)
        except Exception as err:  # tracking trouble must not fail the run
            result["error"] = err

    thread = threading.Thread(target=work, name="mlflow-log", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("MLflow logging of %s did not finish within %.0f s; the record file keeps the run", record["run_key"], timeout_s)
        return None
    if "error" in result:
        log.warning("MLflow logging of %s failed (%s); the record file keeps the run", record["run_key"], result["error"])
        return None
    return result["run_id"]
