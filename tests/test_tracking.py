"""MLflow tracking: one run per identity, and trouble never fails the caller."""

from __future__ import annotations

import time

import spbench.tracking as tracking
from spbench.tracking import ATTEMPTS, RUN_KEY_TAG, flatten, init_experiment, log_run, server_answers
from test_results import make_record


def fail_log_batch(monkeypatch, at: int | None = 1) -> list[str]:
    """Make the ``at``-th call of MlflowClient.log_batch raise (None: every call); returns the
    list that receives the run id of each call that failed. Pauses between tries are skipped."""
    from mlflow.tracking import MlflowClient

    real, calls, failures = MlflowClient.log_batch, [], []

    def flaky(self, run_id, **kwargs):
        calls.append(run_id)
        if at is None or len(calls) == at:
            failures.append(run_id)
            raise RuntimeError("database is locked")
        return real(self, run_id, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    return failures


def test_log_run_once_per_identity(tmp_path):
    """Logging the same run key twice leaves one FINISHED run with the params and curve."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = init_experiment(uri, "t")
    assert init_experiment(uri, "t") == exp_id
    record = make_record(run_key="main/s/t/l2_sp/alpha=0.1_beta=0.01_lr=0.5/freeze0/test/rep0", freeze=0, test_accuracy=0.75)
    first = log_run(uri, "t", record, {"run": {"seed": 7}, "grid": [1, 2]}, [1.0, 0.5, 0.25])
    second = log_run(uri, "t", record, {"run": {"seed": 7}}, [1.0])
    assert first is not None and first == second
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([exp_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[RUN_KEY_TAG] == record["run_key"]
    assert {k: run.data.tags[k] for k in ("method", "setting", "source", "target", "replicate", "freeze")} == {
        "method": "l2_sp", "setting": "alpha=0.1_beta=0.01_lr=0.5", "source": "s", "target": "t", "replicate": "0", "freeze": "0"}
    assert run.data.metrics["test_accuracy"] == 0.75
    assert run.data.params == {"run.seed": "7", "grid": "[1, 2]"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.0, 0.5, 0.25]


def test_local_store_failure_is_retried_and_leaves_no_running_run(tmp_path, monkeypatch):
    """A local store whose write fails once mid-run: the half-logged run is marked FAILED, not
    left RUNNING; the next attempt replaces it, and one FINISHED run remains."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = init_experiment(uri, "t")
    failures = fail_log_batch(monkeypatch)
    record = make_record(run_key="main/s/t/l2_sp/alpha=0.1_beta=0.01_lr=0.5/freeze0/test/rep0", freeze=0)
    run_id = log_run(uri, "t", record, {"run": {"seed": 7}}, [1.0, 0.5])
    assert run_id is not None and failures and failures[0] != run_id
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([exp_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert client.get_run(failures[0]).info.lifecycle_stage == "deleted"  # the failed attempt, replaced


def test_unreachable_server_does_not_raise_or_hang(monkeypatch):
    """A tracking server that is down yields None within the deadline instead of an error."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    start = time.monotonic()
    # Port 9 (discard) on loopback: nothing listens there.
    assert log_run("http://127.0.0.1:9", "t", make_record(), {}, [1.0], timeout_s=20) is None
    assert time.monotonic() - start < 25


def _failing_log(monkeypatch, error: Exception) -> tuple[list, list]:
    """Every logging attempt raises ``error``; returns the URIs tried and the pauses taken."""
    calls, sleeps = [], []

    def failing(uri, *args, **kwargs):
        calls.append(uri)
        raise error

    monkeypatch.setattr(tracking, "_log", failing)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return calls, sleeps


def test_a_server_that_does_not_answer_is_tried_once(monkeypatch):
    """A failed attempt on a server that does not answer /health is not repeated: the server
    is down, and the run is left to `sync_tracking` (no minutes of retries against an outage)."""
    calls, sleeps = _failing_log(monkeypatch, ConnectionError("connection refused"))
    assert not server_answers("http://127.0.0.1:9", timeout_s=2)
    assert log_run("http://127.0.0.1:9", "t", make_record(), {}, [1.0], timeout_s=20) is None
    assert calls == ["http://127.0.0.1:9"] and sleeps == []


def test_a_local_store_that_keeps_failing_is_tried_attempts_times(tmp_path, monkeypatch):
    """Three tries, a growing pause between, then None (the record file keeps the run)."""
    calls, sleeps = _failing_log(monkeypatch, RuntimeError("database is locked"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert log_run(uri, "t", make_record(), {}, [1.0]) is None
    assert len(calls) == ATTEMPTS == 3 and sleeps == [1, 2]


def test_an_attempt_that_timed_out_is_not_repeated(tmp_path, monkeypatch):
    """An attempt still running at the deadline may yet land: a second one could log the run
    twice, so log_run gives up and leaves it to `sync_tracking`."""
    import threading

    calls, release = [], threading.Event()

    def hanging(*args, **kwargs):
        calls.append(args[0])
        release.wait(10)
        raise RuntimeError("released")

    monkeypatch.setattr(tracking, "_log", hanging)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    try:
        assert log_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", make_record(), {}, [1.0], timeout_s=0.2) is None
        assert len(calls) == 1
    finally:
        release.set()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_run_is_a_training_run_with_its_times_name_and_dataset(tmp_path):
    """The experiment is a model-training one (the UI opens on its runs); the run's start and
    end are the training's, its name is short, its input dataset is the target task."""
    from mlflow.tracking import MlflowClient

    from spbench.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, run_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = init_experiment(uri, "t")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    record = make_record(freeze=0, started_at=1_700_000_000.25, ended_at=1_700_000_012.75,
                         target_dataset={"name": "t", "digest": "ab" * 32, "source": "data/t", "builder": "digits_mod3",
                                         "n_train": 15, "n_eval": 886, "num_classes": 3, "evaluation": "test"})
    run_id = log_run(uri, "t", record, {}, [1.0])
    run = client.get_run(run_id)
    assert (run.info.start_time, run.info.end_time) == (1_700_000_000_250, 1_700_000_012_750)
    assert run.info.run_name == run_name(record) == "l2_sp · t · alpha=0.1,beta=0.01 · lr=0.5 · rep0"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "t" and inp.dataset.digest == ("ab" * 32)[:36]
    assert '"n_train": 15' in inp.dataset.profile and '"num_classes": 3' in inp.dataset.profile
    # an experiment made before gets the kind when the workflow starts again
    other = client.create_experiment("old")
    init_experiment(uri, "old")
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert run_name(make_record(experiment="select", evaluation="val0", replicate=1, freeze=2)).startswith("select/val0 · ")


def test_post_hoc_variants_are_metrics_of_the_one_run(tmp_path):
    """A validation run that scored several post-hoc values (WiSE-FT's a) logs one MLflow run,
    with each value's accuracies as metrics named by its setting."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = make_record(run_key="select/s/t/wise_ft/lr=0.1/freeze0/val0/rep0", freeze=0, method="wise_ft",
                         setting="lr=0.1", evaluation="val0", experiment="select")
    record["variants"] = [{"setting": f"lr=0.1_mix={a}", "test_accuracy": 0.5 + a / 10, "source_accuracy": 0.9 - a / 10}
                          for a in (0.5, 1.0)]
    log_run(uri, "t", record, {}, [1.0])
    (run,) = MlflowClient(tracking_uri=uri).search_runs([init_experiment(uri, "t")])
    assert run.data.metrics["variants/lr:0.1_mix:0.5/test_accuracy"] == 0.55
    assert run.data.metrics["variants/lr:0.1_mix:1.0/source_accuracy"] == 0.8


def test_batches_respect_mlflow_limits_and_keep_everything():
    from spbench.tracking import _batches

    for n_metrics, n_params in [(0, 0), (5, 3), (1000, 0), (950, 100), (2500, 250), (0, 101)]:
        metrics, params = list(range(n_metrics)), list(range(n_params))
        batches = list(_batches(metrics, params))
        assert all(len(m) <= 1000 and len(p) <= 100 and len(m) + len(p) <= 1000 and (m or p) for m, p in batches)
        assert [x for m, _ in batches for x in m] == metrics and [x for _, p in batches for x in p] == params
        # as few calls as the limits allow
        assert len(batches) == max(-(-n_params // 100), -(-(n_metrics + n_params) // 1000))


def test_sync_logs_each_missing_record_once_and_replaces_a_half_logged_run(tmp_path):
    """sync_runs lists the experiment once: a FINISHED run is left alone, a half-logged one
    (RUNNING) is deleted and logged again, the others are logged; a curve and a config past
    one call's limits (1000 metrics, 100 params) arrive whole; a second sync logs nothing."""
    import json

    from mlflow.tracking import MlflowClient

    from spbench.tracking import sync_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = init_experiment(uri, "t")
    config = {f"p{i}": i for i in range(130)}
    records = [make_record(run_key=f"main/s/t/l2/alpha=0.1_beta=0.01_lr=0.5/freeze0/test/rep{r}", replicate=r,
                           config_json=json.dumps(config), train_loss=[1.0 / (s + 1) for s in range(1200)]) for r in range(3)]
    assert log_run(uri, "t", records[0], config, records[0]["train_loss"]) is not None
    client = MlflowClient(tracking_uri=uri)
    stale = client.create_run(exp_id, tags={RUN_KEY_TAG: records[1]["run_key"]})  # a crash before it finished
    counts = sync_runs(uri, "t", records)
    assert counts == {"records": 3, "already": 1, "logged": 2, "failed": 0}
    runs = client.search_runs([exp_id])
    assert sorted(r.data.tags[RUN_KEY_TAG] for r in runs) == sorted(r["run_key"] for r in records)
    assert all(r.info.status == "FINISHED" for r in runs) and stale.info.run_id not in {r.info.run_id for r in runs}
    for run in runs:
        assert len(run.data.params) == 130
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1200
    assert sync_runs(uri, "t", records) == {"records": 3, "already": 3, "logged": 0, "failed": 0}


def test_sync_retries_a_record_whose_logging_failed_once(tmp_path, monkeypatch):
    """One failed write in the middle of a sync does not stop it: the record is tried again,
    its failed attempt's run is replaced, and every record ends as one FINISHED run."""
    from mlflow.tracking import MlflowClient

    from spbench.tracking import sync_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = init_experiment(uri, "t")
    records = [make_record(run_key=f"main/s/t/l2/alpha=0.1_beta=0.01_lr=0.5/freeze0/test/rep{r}", replicate=r,
                           config_json="{}", train_loss=[1.0, 0.5]) for r in range(3)]
    failures = fail_log_batch(monkeypatch, at=2)  # the second record's first write
    assert sync_runs(uri, "t", records) == {"records": 3, "already": 0, "logged": 3, "failed": 0}
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([exp_id])
    assert sorted(r.data.tags[RUN_KEY_TAG] for r in runs) == sorted(r["run_key"] for r in records)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(failures[0]).info.lifecycle_stage == "deleted"
