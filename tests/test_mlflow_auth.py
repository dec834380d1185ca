"""The documented access control works: `python -m spbench.tracking serve --basic-auth` on
127.0.0.1 refuses an anonymous REST call, accepts a user's credentials, and a workflow's jobs
log their runs with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_mlflow_server import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
ADMIN = ("admin", "admin-Secret-9731")
USER = ("alice", "alice-Secret-4127")

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def _call(url: str, path: str, *, auth=None, body=None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def auth_server(root: Path):
    """The README's server with --basic-auth (test_mlflow_server.mlflow_server), the admin's
    password in the environment and no settings file of the caller's."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_CONFIG_PATH"}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = ADMIN[1]
    return mlflow_server(root, free_port(), "--basic-auth", env=env)


def test_serve_refuses_to_start_without_an_admin_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH_")}
    proc = subprocess.run([sys.executable, "-m", "spbench.tracking", "serve", "--basic-auth",
                           "--artifacts", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stderr


def test_basic_auth_server_and_a_workflow_that_signs_in(tmp_path):
    with auth_server(tmp_path) as url:
        search = "/api/2.0/mlflow/experiments/search?max_results=5"
        assert _call(url, search)[0] == 401
        assert _call(url, search, auth=("alice", "wrong"))[0] == 401
        status, _ = _call(url, "/api/2.0/mlflow/users/create", auth=ADMIN,
                          body={"username": USER[0], "password": USER[1]})
        assert status == 200
        assert _call(url, search, auth=USER)[0] == 200

        config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
        config["tracking"] = {"uri": url, "experiment": "auth-test", "timeout_s": 60}
        config["grid"]["methods"] = {"none": {}, "l2_sp": {"alpha": [0.1]}}
        config["grid"]["replicates"] = 1
        config["finetune"]["steps"] = 4
        config["sources"]["digits-src"]["pretrain"]["epochs"] = 1
        for key in ("figures", "selection"):
            config.pop(key)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1]}
        proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                               "c.yaml", "--cores", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        status, found = _call(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=auth-test", auth=USER)
        assert status == 200
        exp_id = found["experiment"]["experiment_id"]
        status, runs = _call(url, "/api/2.0/mlflow/runs/search", auth=USER,
                             body={"experiment_ids": [exp_id], "max_results": 100})
        assert status == 200
        keys = [{t["key"]: t["value"] for t in run["data"].get("tags", [])}.get("spbench.run_key")
                for run in runs.get("runs", [])]
        records = sorted(str(p.parent.relative_to(tmp_path / "results" / "runs"))
                         for p in (tmp_path / "results" / "runs").rglob("record.json"))
        assert sorted(keys) == records and len(records) == 2
