"""MLflow tracking for fine-tune runs, never allowed to fail or hang a run.

The run's JSON record is the source of truth; MLflow is a browsable copy. Logging happens
after the record is written, in a worker thread with a deadline: on any error or timeout a
warning is logged and the run still succeeds. A run's identity (its ``run_key``) is stored as
the tag ``spbench.run_key``; logging a key that already has a finished run does nothing, so
a retried job never creates a duplicate. Logging that fails while the store is up (a local
store, or a server that still answers ``/health``) is tried again; when the server was down,
:func:`sync_runs` logs the records that MLflow lacks, later.

Server mode: ``python -m spbench.tracking serve`` starts ``mlflow server`` (SQLite or
PostgreSQL store, an artifact folder) bound to 127.0.0.1 unless told otherwise; every job of
a workflow whose ``tracking.uri`` is the server's URL logs to it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import secrets
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

__all__ = [
    "init_experiment",
    "server_answers",
    "try_init_experiment",
    "log_run",
    "logged_keys",
    "sync_runs",
    "server_command",
    "flatten",
    "RUN_KEY_TAG",
]

log = logging.getLogger(__name__)

RUN_KEY_TAG = "spbench.run_key"
#: Tries of logging one run (:func:`log_run`, :func:`sync_runs`) while the store is up: a local
#: store (SQLite, files) that fails, or a server that fails a request but still answers
#: ``/health``, is busy or failed once.
ATTEMPTS = 3
#: Seconds that :func:`server_answers` waits for ``/health``.
HEALTH_TIMEOUT_S = 5.0
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
#: Record fields logged as run tags (for filtering in the MLflow UI): the method and the
#: canonical text of its setting (spbench.config.format_setting) among them.
TAG_FIELDS = ("method", "setting", "source", "target", "replicate", "freeze")
#: The experiment tag that makes the MLflow UI open an experiment on its training runs (not on
#: its GenAI overview of traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def runs_page(base_url: str, experiment_id: str | None) -> str:
    """The MLflow UI's page of an experiment's training runs. MLflow 3's UI opens an
    experiment on the view of its global GenAI / model-training switch (GenAI by default),
    whatever the experiment's kind; ``workflowType=machine_learning`` selects the runs."""
    base = base_url.rstrip("/")
    where = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base}/#/{where}?workflowType=machine_learning"


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
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def run_name(record: Mapping[str, Any]) -> str:
    """A short, readable MLflow run name: method, target, setting (its hyper-parameters, lr
    last), replicate, and the experiment and evaluation where they are not the main test run,
    e.g. ``l2_sp · digits-mod3-k5 · alpha=0.1,beta=0.01 · lr=0.05 · rep0``. The full key is the
    tag ``spbench.run_key``."""
    from .config import parse_setting

    setting = parse_setting(record["setting"])
    hparams = ",".join(f"{k}={setting[k]:g}" for k in sorted(setting) if k != "lr")
    parts = [record["method"], record["target"], *([hparams] if hparams else []), f"lr={setting['lr']:g}",
             f"rep{record['replicate']}"]
    if record.get("freeze"):
        parts.insert(-1, f"freeze{record['freeze']}")
    if record.get("experiment", "main") != "main" or record.get("evaluation", "test") != "test":
        parts.insert(0, f"{record['experiment']}/{record['evaluation']}")
    return " · ".join(parts)


def _dataset_input(record: Mapping[str, Any]):
    """The run's target task as an MLflow input dataset (name, content digest, split sizes)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    info = record.get("target_dataset")
    if not info:
        return None
    profile = {k: info[k] for k in ("n_train", "n_eval", "num_classes", "evaluation", "builder") if k in info}
    dataset = Dataset(name=info["name"], digest=(info.get("digest") or "unknown")[:36], source_type="local",
                      source=json.dumps({"uri": info.get("source", "")}), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def _batches(metrics: list, params: list) -> Iterable[tuple[list, list]]:
    """A run's metrics and params in as few ``log_batch`` calls as MLflow's limits allow (per
    call: 1000 metrics, 100 params, 1000 entities in all)."""
    while metrics or params:
        p = params[:100]
        m = metrics[: 1000 - len(p)]
        yield m, p
        metrics, params = metrics[len(m) :], params[len(p) :]


def _log(uri: str, experiment: str, record: Mapping[str, Any], params: Mapping[str, Any], curve: list[float], *,
         client=None, exp_id: str | None = None, earlier: list | None = None) -> str:
    """Log one run. ``client``, ``exp_id`` and ``earlier`` (the runs MLflow already holds under
    the record's key) may come from a caller that logs many runs and has listed them once;
    by default they are looked up here."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri=uri)
    if exp_id is None:
        exp_id = _experiment_id(client, uri, experiment)
    key = record["run_key"]
    if earlier is None:
        earlier = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    for run in earlier:
        if run.info.status == "FINISHED":
            log.info("MLflow already holds run %s (%s): not logged again", key, run.info.run_id)
            return run.info.run_id
        client.delete_run(run.info.run_id)  # a half-logged earlier attempt
    tags = {RUN_KEY_TAG: key, **{f: str(record[f]) for f in TAG_FIELDS}, "spbench.device": str(record["device"]),
            "spbench.version": str(record["spbench_version"])}
    # the run's times are the training's (the record's), not the logging's
    start_ms = int(1000 * record["started_at"]) if "started_at" in record else None
    end_ms = int(1000 * record["ended_at"]) if "ended_at" in record else None
    run = client.create_run(exp_id, start_time=start_ms, run_name=run_name(record), tags=tags)
    run_id = run.info.run_id
    try:
        _fill(client, run_id, record, params, curve, end_ms)
    except BaseException:
        try:  # not left RUNNING: a later attempt (or sync_runs) deletes it and logs the run anew
            client.set_terminated(run_id, "FAILED")
        except Exception:
            pass
        raise
    return run_id


def _fill(client, run_id: str, record: Mapping[str, Any], params: Mapping[str, Any], curve: list[float],
          end_ms: int | None) -> None:
    """Log a created run's metrics, params and input dataset, then mark it FINISHED."""
    from mlflow.entities import Metric, Param

    now = end_ms or int(time.time() * 1000)
    metrics = [Metric("train_loss", float(v), now, step) for step, v in enumerate(curve)]
    metrics += [Metric(name, float(record[name]), now, 0) for name in FINAL_METRICS]
    for variant in record.get("variants") or []:  # post-hoc values scored from this training
        prefix = "variants/" + variant["setting"].replace("=", ":")  # MLflow keys allow no '='
        metrics += [Metric(f"{prefix}/{name}", float(variant[name]), now, 0) for name in ("test_accuracy", "source_accuracy")]
    flat = flatten(params)
    params_list = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for m, p in _batches(metrics, params_list):
        client.log_batch(run_id, metrics=m, params=p)
    dataset = _dataset_input(record)
    if dataset is not None:
        client.log_inputs(run_id, datasets=[dataset])
    client.set_terminated(run_id, "FINISHED", end_time=end_ms)


def _is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (whose failure is an outage) rather than a local store."""
    return uri.startswith(("http://", "https://"))


def server_answers(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether the tracking server at ``uri`` answers its ``/health`` endpoint (open also on a
    server with basic auth) with 200 within ``timeout_s``."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


class _Outcome(NamedTuple):
    done: bool  # the work returned
    value: Any  # what it returned (None unless done)
    timed_out: bool  # it was still running at the deadline (it may yet finish)


def _with_deadline(work: Callable[[], Any], timeout_s: float, what: str) -> _Outcome:
    """Run ``work`` in a daemon thread, at most ``timeout_s`` (a hung request must not hold the
    job); when it raised or outlived the deadline, a warning says so."""
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = work()
        except Exception as err:  # tracking trouble must not fail the caller
            result["error"] = err

    thread = threading.Thread(target=target, name="mlflow", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("MLflow: %s did not finish within %.0f s; the record file keeps the run", what, timeout_s)
        return _Outcome(False, None, True)
    if "error" in result:
        log.warning("MLflow: %s failed (%s); the record file keeps the run", what, result["error"])
        return _Outcome(False, None, False)
    return _Outcome(True, result["value"], False)


def _tried(uri: str, timeout_s: float, what: str, work: Callable[[int], Any]) -> _Outcome:
    """``work(attempt)`` under :func:`_with_deadline`, tried again (up to :data:`ATTEMPTS`, a
    growing pause between) while the store is up: always for a local store (busy, or failed
    once), and for a server while it answers ``/health`` (when runs log the same new input
    dataset at once, MLflow's SQL store refuses some of them with BAD_REQUEST, on a UNIQUE
    constraint; a request may fail under load). A server that does not answer is down: no
    minutes of retries against an outage. An attempt that outlived ``timeout_s`` is not
    repeated: its request may still land, and a second attempt could then log a run twice."""
    outcome = _Outcome(False, None, False)
    for attempt in range(1, ATTEMPTS + 1):
        outcome = _with_deadline(functools.partial(work, attempt), timeout_s, f"{what} (attempt {attempt} of {ATTEMPTS})")
        if outcome.done or outcome.timed_out or attempt == ATTEMPTS:
            break
        if _is_server(uri) and not server_answers(uri):
            log.warning("MLflow: the server at %s does not answer; not tried again (`snakemake sync_tracking` "
                        "logs what is missing later)", uri)
            break
        time.sleep(attempt)
    return outcome


def try_init_experiment(uri: str, experiment: str, *, timeout_s: float = 60.0) -> str | None:
    """:func:`init_experiment` that never raises: None (and a warning) when the server is down.
    The runs are then logged later by :func:`sync_runs`. A local store (SQLite) that fails is
    an error, not an outage: it raises."""
    if not _is_server(uri):
        return init_experiment(uri, experiment)
    _bound_http_retries()
    done, exp_id, _ = _with_deadline(lambda: init_experiment(uri, experiment), timeout_s, f"creating experiment {experiment!r}")
    return exp_id if done else None


def _experiment_id(client, uri: str, experiment: str) -> str:
    """The experiment's id, created (:func:`init_experiment`) when it does not exist yet."""
    exp = client.get_experiment_by_name(experiment)
    return exp.experiment_id if exp is not None else init_experiment(uri, experiment)


def _finished_keys(runs: Mapping[str, list]) -> set[str]:
    """The keys of :func:`_runs_by_key` that hold a FINISHED run."""
    return {key for key, found in runs.items() if any(run.info.status == "FINISHED" for run in found)}


def _runs_by_key(client, exp_id: str) -> dict[str, list]:
    """Every (not deleted) run of the experiment, by run key: one listing, page by page."""
    runs: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        for run in page:
            runs.setdefault(run.data.tags.get(RUN_KEY_TAG, ""), []).append(run)
        token = page.token
        if not token:
            runs.pop("", None)
            return runs


def logged_keys(uri: str, experiment: str) -> set[str]:
    """Run keys of the FINISHED runs of ``experiment`` (empty when it does not exist)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    return _finished_keys(_runs_by_key(client, exp.experiment_id))


def sync_runs(uri: str, experiment: str, records: Iterable[Mapping[str, Any]], *, timeout_s: float = 60.0) -> dict[str, int]:
    """Log every record that MLflow lacks (its params are the record's resolved config, its
    curve the record's train loss); returns counts ``{"records", "already", "logged",
    "failed"}``. The experiment's runs are listed once; a half-logged run (not FINISHED) of a
    missing record is deleted before the record is logged again. A record whose logging fails
    is tried again while the store is up (see :func:`_tried`); after that, the sync stops:
    the server is likely down again."""
    from mlflow.tracking import MlflowClient

    _bound_http_retries()
    records = list(records)
    client = MlflowClient(tracking_uri=uri)

    def listing():
        exp_id = _experiment_id(client, uri, experiment)
        return exp_id, _runs_by_key(client, exp_id)

    done, listed, _ = _with_deadline(listing, timeout_s, "listing logged runs")
    if not done:
        return {"records": len(records), "already": 0, "logged": 0, "failed": len(records)}
    exp_id, runs = listed
    have = _finished_keys(runs)
    missing = [r for r in records if r["run_key"] not in have]
    logged = 0
    for record in missing:
        params = json.loads(record["config_json"])
        # a retry looks the record's runs up again: the failed attempt left one to replace
        work = lambda attempt: _log(uri, experiment, record, params, record["train_loss"], client=client,  # noqa: E731
                                    exp_id=exp_id, earlier=runs.get(record["run_key"], []) if attempt == 1 else None)
        if not _tried(uri, timeout_s, f"logging {record['run_key']}", work).done:
            break
        logged += 1
    counts = {"records": len(records), "already": len(records) - len(missing), "logged": logged, "failed": len(missing) - logged}
    log.info("MLflow sync of %s: %s", experiment, counts)
    return counts


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
    out (a warning says why). Never raises for tracking trouble.

    A failed attempt is tried again while the store is up (see :func:`_tried`); a server that
    does not answer is down, and the run is left to :func:`sync_runs`."""
    _bound_http_retries()
    outcome = _tried(uri, timeout_s, f"logging {record['run_key']}", lambda attempt: _log(uri, experiment, record, params, curve))
    return outcome.value if outcome.done else None


def server_command(
    *,
    store: str,
    artifacts: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    basic_auth: bool = False,
) -> list[str]:
    """The ``mlflow server`` command line of the shared tracking server.

    ``store``: a SQLAlchemy URI (``sqlite:///path/mlflow.db``,
    ``postgresql://user:pass@host/db``); ``artifacts``: the folder the server keeps artifacts
    in (it serves them, so jobs need no access to it). ``host`` defaults to loopback: bind to
    0.0.0.0 only on a trusted network, with ``basic_auth`` (MLflow's ``basic-auth`` app:
    users and passwords, admin credentials from ``MLFLOW_AUTH_CONFIG_PATH``; jobs then set
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``).
    """
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", store,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
    ]
    if host not in ("127.0.0.1", "localhost", "::1"):
        # MLflow's security middleware accepts loopback Host headers only by default.
        cmd += ["--allowed-hosts", "*"]
    if basic_auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def auth_environment(folder: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a ``--basic-auth`` server: MLflow's auth app reads its settings from
    ``MLFLOW_AUTH_CONFIG_PATH`` (here, unless set, ``folder/basic_auth.ini``, its user store
    ``folder/basic_auth.db`` beside the tracking store, anonymous requests refused, every
    signed-in user may read; the CSRF key ``MLFLOW_FLASK_SERVER_SECRET_KEY``, unless set, made
    once into ``folder/flask_secret_key``) and creates the admin user ``MLFLOW_AUTH_ADMIN_USERNAME``
    (default ``admin``) on first start with the password ``MLFLOW_AUTH_ADMIN_PASSWORD``, which
    must be set: there is no default password."""
    if not environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") and not environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        raise ValueError("--basic-auth needs the admin's password in MLFLOW_AUTH_ADMIN_PASSWORD (used when the "
                         "user store is created) or a settings file in MLFLOW_AUTH_CONFIG_PATH")
    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    if not environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # the auth app's CSRF protection needs a key that survives restarts: made once, kept
        # beside the user store, readable by its owner only
        key_file = folder / "flask_secret_key"
        if not key_file.exists():
            key_file.touch(mode=0o600)
            key_file.write_text(secrets.token_hex(32))
        out["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key_file.read_text().strip()
    if environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        return out
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        f"admin_username = {environ.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {**out, "MLFLOW_AUTH_CONFIG_PATH": str(ini)}


def main(argv: list[str] | None = None) -> int:
    """``python -m spbench.tracking serve|sync``: start the tracking server, or log the runs
    whose records MLflow lacks (after an outage)."""
    parser = argparse.ArgumentParser(prog="python -m spbench.tracking", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start `mlflow server` (runs until stopped)")
    serve.add_argument("--store", default="sqlite:///mlflow-server/mlflow.db", help="backend store URI (SQLite or PostgreSQL)")
    serve.add_argument("--artifacts", default="mlflow-server/artifacts", help="artifact folder")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--basic-auth", action="store_true", help="require MLflow users and passwords")
    sync = sub.add_parser("sync", help="log the records that MLflow lacks")
    sync.add_argument("--uri", required=True)
    sync.add_argument("--experiment", required=True)
    sync.add_argument("records", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.store.startswith("sqlite:///"):
            Path(args.store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        Path(args.artifacts).mkdir(parents=True, exist_ok=True)
        if args.basic_auth:
            try:
                os.environ.update(auth_environment(Path(args.artifacts).resolve().parent))
            except ValueError as err:
                parser.error(str(err))
        cmd = server_command(
            store=args.store, artifacts=args.artifacts, host=args.host, port=args.port, workers=args.workers, basic_auth=args.basic_auth
        )
        os.execvp(cmd[0], cmd)
    from .results import read_record

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    counts = sync_runs(args.uri, args.experiment, (read_record(p) for p in args.records))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
