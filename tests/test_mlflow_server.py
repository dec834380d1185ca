"""A real shared MLflow server on 127.0.0.1 (`python -m spbench.tracking serve`, the README's
command): a parallel workflow logs every run to it exactly once; with the server down the
fine-tunes still finish, and `snakemake sync_tracking` logs the missing runs once it is back;
the MLflow UI, opened in headless Chromium, shows the experiment and its runs."""

from __future__ import annotations

import contextlib
import html
import itertools
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from spbench.results import read_parquet, read_record
from spbench.tracking import ATTEMPTS, init_experiment, log_run, run_name, runs_page, server_answers
from test_results import make_record
from test_tracking import fail_log_batch

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, port: int, *args: str, env: dict | None = None):
    """`python -m spbench.tracking serve [args]` on 127.0.0.1:port with a SQLite store under
    root, in root, with ``env`` (default: this process's); yields its URL once /health
    answers, and stops it (the whole process group) after."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "spbench.tracking", "serve", *args, "--port", str(port), "--workers", "1",
           "--store", f"sqlite:///{root / 'server' / 'mlflow.db'}", "--artifacts", str(root / "server" / "artifacts")]
    log = open(root / f"server-{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / f'server-{port}.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer /health within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def write_config(workdir: Path, uri: str, experiment: str, small: bool = False) -> Path:
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["tracking"].update(uri=uri, experiment=experiment, timeout_s=30)
    # The grid's runs are enough here: selection and figure runs are logged by the same code.
    config.pop("selection", None)
    config.pop("figures", None)
    if small:
        config["grid"]["replicates"] = 1
        config["grid"]["methods"] = {"none": {}, "l2_sp": {"alpha": [0.1], "beta": [0.01]}}
    else:
        # long enough that every run trains for over a second, also the later runs of a run
        # group (which skip the process's start-up costs)
        config["finetune"]["steps"] = 400
    path = workdir / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tracked_keys(uri: str, experiment: str) -> Counter:
    """How many active, finished runs each run key has on the server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert all(r.info.status == "FINISHED" for r in runs)
    return Counter(r.data.tags["spbench.run_key"] for r in runs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(root, free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def parallel_workflow(server, tmp_path_factory):
    """config/tiny.yaml, two jobs at a time, every job logging to the server."""
    workdir = tmp_path_factory.mktemp("wf-server")
    config = write_config(workdir, server, "spbench-server")
    proc = snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir


def test_parallel_workflow_logs_every_run_once(server, parallel_workflow):
    runs = read_parquet(parallel_workflow / "results" / "runs.parquet")
    counts = tracked_keys(server, "spbench-server")
    assert set(counts) == set(runs["run_key"])
    assert set(counts.values()) == {1}
    assert not (parallel_workflow / "results" / "mlflow.db").exists()  # nothing went to a local store


def test_a_failed_request_to_a_server_that_answers_is_retried(server, monkeypatch):
    """A request that fails while the server still answers /health (refused, or failed under
    load) is tried again: one FINISHED run, the failed attempt's run deleted."""
    from mlflow.tracking import MlflowClient

    assert server_answers(server)
    exp_id = init_experiment(server, "spbench-retry")
    failures = fail_log_batch(monkeypatch)
    record = make_record(run_key="main/s/t/l2_sp/alpha=0.1_beta=0.01_lr=0.5/freeze0/test/rep0", freeze=0)
    run_id = log_run(server, "spbench-retry", record, {"run": {"seed": 7}}, [1.0, 0.5])
    assert run_id is not None and failures and failures[0] != run_id
    client = MlflowClient(tracking_uri=server)
    assert [(r.info.run_id, r.info.status) for r in client.search_runs([exp_id])] == [(run_id, "FINISHED")]
    assert client.get_run(failures[0]).info.lifecycle_stage == "deleted"


def test_a_server_that_keeps_failing_is_tried_attempts_times(server, monkeypatch):
    """Every request fails but /health answers: three attempts, then None, and no run left
    RUNNING (each attempt's half-logged run is marked FAILED, then replaced by the next)."""
    from mlflow.tracking import MlflowClient

    exp_id = init_experiment(server, "spbench-failing")
    created = fail_log_batch(monkeypatch, at=None)
    assert log_run(server, "spbench-failing", make_record(), {}, [1.0]) is None
    assert len(created) == ATTEMPTS
    client = MlflowClient(tracking_uri=server)
    active = client.search_runs([exp_id])
    assert [(r.info.run_id, r.info.status) for r in active] == [(created[-1], "FAILED")]


def test_runs_of_one_target_logged_at_once_all_arrive(server, monkeypatch):
    """Jobs of one target that end together log the same input dataset at once; MLflow's SQL
    store refuses some of them with BAD_REQUEST (a UNIQUE constraint on the datasets
    table). Each run is still logged once and FINISHED: the refused attempt is tried again,
    and by then the dataset exists. Six runs meet at log_inputs, three times over."""
    import threading

    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_inputs
    for trial in range(3):
        experiment = f"spbench-together-{trial}"
        exp_id = init_experiment(server, experiment)
        meet, calls = threading.Barrier(6, timeout=60), itertools.count()

        def together(self, run_id, datasets=None, **kwargs):
            if next(calls) < 6:  # the six first attempts meet; a retry goes straight on
                meet.wait()
            return real(self, run_id, datasets=datasets, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_inputs", together)
        target = {"name": "t", "digest": "cd" * 32, "source": "data/t", "n_train": 15, "n_eval": 886, "num_classes": 3}
        records = [make_record(run_key=f"main/s/t/l2_sp/alpha=0.1_beta=0.01_lr=0.5/freeze0/test/rep{r}", replicate=r,
                               freeze=0, target_dataset=target) for r in range(6)]
        ids = [None] * 6
        threads = [threading.Thread(target=lambda i=i: ids.__setitem__(i, log_run(server, experiment, records[i], {}, [1.0])))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(ids), ids
        runs = MlflowClient(tracking_uri=server).search_runs([exp_id])
        assert sorted((r.info.run_id, r.info.status) for r in runs) == sorted((i, "FINISHED") for i in ids)
        assert all(len(r.inputs.dataset_inputs) == 1 for r in runs)


def test_outage_keeps_records_and_sync_logs_them_once(tmp_path):
    """Server down: every fine-tune finishes with its record. Server back: `snakemake
    sync_tracking` logs each run once; a second sync and a retried fine-tune add nothing."""
    port = free_port()  # nothing listens here until the server is started below
    uri = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, uri, "spbench-outage", small=True)
    proc = snakemake(tmp_path, "--configfile", str(config), "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = read_parquet(tmp_path / "results" / "runs.parquet")
    assert len(runs) == 2
    logs = "".join(p.read_text() for p in (tmp_path / "logs" / "finetune").rglob("*.log"))
    assert "the record file keeps the run" in logs

    with mlflow_server(tmp_path, port):
        proc = snakemake(tmp_path, "--configfile", str(config), "--cores", "1", "sync_tracking")
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert tracked_keys(uri, "spbench-outage") == Counter({key: 1 for key in runs["run_key"]})
        proc = snakemake(tmp_path, "--configfile", str(config), "--cores", "1", "sync_tracking")
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert "'already': 2" in (tmp_path / "logs" / "sync_tracking.log").read_text()
        # a retried job (same identity) finds its run on the server and does not log it again
        key = runs["run_key"].iloc[0]
        record = tmp_path / "results" / "runs" / key / "record.json"
        before = read_record(record)
        proc = snakemake(tmp_path, "--configfile", str(config), "--cores", "1", "--forcerun", str(record.relative_to(tmp_path)),
                         "--", str(record.relative_to(tmp_path)))
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert read_record(record)["test_accuracy"] == before["test_accuracy"]
        assert tracked_keys(uri, "spbench-outage") == Counter({key: 1 for key in runs["run_key"]})


def test_sync_fails_while_the_server_is_down(tmp_path):
    """With the server still down, sync_tracking fails and says how many runs are missing."""
    from spbench.tracking import sync_runs

    counts = sync_runs(f"http://127.0.0.1:{free_port()}", "x", [make_record(run_key="a/b")], timeout_s=20)
    assert counts == {"records": 1, "already": 0, "logged": 0, "failed": 1}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / "tests" / "cluster" / "install.sh")], check=True, stdin=subprocess.DEVNULL)
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("no Chromium, and it cannot be installed (needs root and apt-get): tests/cluster/install.sh")


def headless(browser: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_ui_shows_the_experiment_and_its_runs(server, parallel_workflow, tmp_path):
    """The MLflow UI, rendered by headless Chromium, lists the experiment's runs; the screenshot
    is kept (SPBENCH_SCREENSHOT_DIR, else the test's temporary folder)."""
    from mlflow.tracking import MlflowClient

    browser = chromium()
    exp = MlflowClient(tracking_uri=server).get_experiment_by_name("spbench-server")
    # the page the workflow's summary prints: the experiment's training runs
    url = runs_page(server, exp.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = read_parquet(parallel_workflow / "results" / "runs.parquet")
    shots = Path(os.environ.get("SPBENCH_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = headless(browser, profile, "--virtual-time-budget=30000", "--dump-dom", url)
    (shots / "mlflow-ui.html").write_text(dom.stdout)
    assert "spbench-server" in dom.stdout, dom.stderr[-3000:]
    page = html.unescape(dom.stdout)
    assert "<title>Runs - " in page and "Token Usage" not in page  # the runs, not the GenAI overview
    # the training runs list, not the GenAI overview: every run by its short name
    names = [run_name(read_record(parallel_workflow / "results" / "runs" / key / "record.json")) for key in runs["run_key"]]
    missing = [name for name in names if name not in page]
    assert not missing, f"runs not in the rendered page: {missing}"
    # durations are the training's (above a second, as the records say), not the logging's
    # (tens of ms); MLflow writes them as 980ms, 1.3s or 1.2min
    unit = {"ms": 1e-3, "s": 1.0, "min": 60.0}
    shown = sorted(float(v) * unit[u] for v, u in re.findall(r">(\d+(?:\.\d+)?)(ms|s|min)<", page))
    trained = sorted(read_record(parallel_workflow / "results" / "runs" / key / "record.json")["wall_seconds"]
                     for key in runs["run_key"])
    assert len(shown) == len(names) and min(shown) > 1.0, shown
    assert shown == pytest.approx(trained, rel=0.05, abs=0.06), (shown, trained)
    # the target task is the runs' input dataset
    assert "digits-mod3-k5" in re.sub(r"<[^>]+>", " ", page.split("Dataset", 1)[-1])
    with tempfile.TemporaryDirectory() as profile:
        shot = headless(browser, profile, "--virtual-time-budget=30000", f"--screenshot={shots / 'mlflow-ui.png'}", url)
    assert (shots / "mlflow-ui.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot.stderr[-3000:]
