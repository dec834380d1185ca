"""MLflow tracking: one run per identity, and trouble never fails the caller."""

from __future__ import annotations

import time

from spbench.tracking import RUN_KEY_TAG, flatten, init_experiment, log_run
from test_results import make_record


def test_log_run_once_per_identity(tmp_path):
    """Logging the same run key twice leaves one FINISHED run with the params and curve."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = init_experiment(uri, "t")
    assert init_experiment(uri, "t") == exp_id
    record = make_record(run_key="main/s/t/l2_sp/alpha=0.1,beta=0.01,lr=0.5/freeze0/test/rep0", freeze=0, test_accuracy=0.75)
    first = log_run(uri, "t", record, {"run": {"seed": 7}, "grid": [1, 2]}, [1.0, 0.5, 0.25])
    second = log_run(uri, "t", record, {"run": {"seed": 7}}, [1.0])
    assert first is not None and first == second
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([exp_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[RUN_KEY_TAG] == record["run_key"]
    assert {k: run.data.tags[k] for k in ("method", "setting", "source", "target", "replicate", "freeze")} == {
        "method": "l2_sp", "setting": "alpha=0.1,beta=0.01,lr=0.5", "source": "s", "target": "t", "replicate": "0", "freeze": "0"}
    assert run.data.metrics["test_accuracy"] == 0.75
    assert run.data.params == {"run.seed": "7", "grid": "[1, 2]"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.0, 0.5, 0.25]


def test_unreachable_server_does_not_raise_or_hang(monkeypatch):
    """A tracking server that is down yields None within the deadline instead of an error."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    start = time.monotonic()
    # Port 9 (discard) on loopback: nothing listens there.
    assert log_run("http://127.0.0.1:9", "t", make_record(), {}, [1.0], timeout_s=20) is None
    assert time.monotonic() - start < 25


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}
