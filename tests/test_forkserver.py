"""The fork server (spbench.forkserver): a job run through it sees its own directory,
environment, command line and streams, exits with its own status, receives the signals sent to
it, and is stopped when its job dies; without a usable server the job runs in its own process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spbench import forkserver

JOB = """
import json, os, signal, sys, time
from spbench.forkserver import delegate, in_worker
delegate()
mode = sys.argv[1]
if mode == "wait":  # until SIGTERM, which writes a marker and exits 7 (as a preempted job fails)
    def on_term(signum, frame):  # the marker appears whole (a test polls for it)
        with open(sys.argv[2] + ".part", "w") as f:
            f.write("terminated")
        os.replace(sys.argv[2] + ".part", sys.argv[2])
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)  # before the line the test waits for
print(json.dumps({"worker": in_worker(), "cwd": os.getcwd(), "pid": os.getpid(), "argv": sys.argv[1:],
                  "env": os.environ.get("JOB_VAR"), "server": os.environ.get("SPBENCH_FORKSERVER"),
                  "tmp": __import__("tempfile").gettempdir()}), flush=True)
print("on stderr", file=sys.stderr, flush=True)
if mode == "wait":
    while True:
        time.sleep(0.05)
if mode == "raise":
    raise RuntimeError("the job failed")
sys.exit(int(mode))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, path = forkserver.start(tmp_path_factory.mktemp("fs"), preload=("json",))
    yield path
    forkserver.stop(proc, path)
    assert proc.returncode is not None and not os.path.exists(path)


@pytest.fixture()
def job(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return script


def _env(server_path, **extra):
    return {**os.environ, forkserver.ENV: server_path, "JOB_VAR": "from the job", **extra}


def _read(proc_stdout: str) -> dict:
    return json.loads(proc_stdout.splitlines()[0])


def test_a_job_runs_in_a_fork_of_the_server_with_its_own_setting(server, job, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = subprocess.run([sys.executable, str(job), "3", "x"], cwd=workdir, capture_output=True, text=True, timeout=60,
                         env=_env(server, TMPDIR=str(tmp_path)))
    assert out.returncode == 3, out.stderr
    seen = _read(out.stdout)
    assert seen["worker"] is True
    assert seen["cwd"] == str(workdir) and seen["argv"] == ["3", "x"] and seen["env"] == "from the job"
    assert seen["tmp"] == str(tmp_path)  # the job's TMPDIR, not the server's
    assert seen["server"] is None  # the job's own subprocesses start afresh
    assert "on stderr" in out.stderr
    journal = Path(server + ".log").read_text()
    assert f"job {seen['pid']} started: {job} 3 x" in journal and f"job {seen['pid']} exited 3" in journal


def test_a_failing_job_reports_its_traceback_and_fails(server, job):
    out = subprocess.run([sys.executable, str(job), "raise"], capture_output=True, text=True, timeout=60,
                         env=_env(server))
    assert out.returncode == 1
    assert _read(out.stdout)["worker"] is True
    assert "RuntimeError: the job failed" in out.stderr


def test_sigterm_to_the_job_reaches_its_child(server, job, tmp_path):
    marker = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, str(job), "wait", str(marker)], stdout=subprocess.PIPE, text=True,
                            env=_env(server))
    seen = json.loads(proc.stdout.readline())
    assert seen["worker"] is True and seen["pid"] != proc.pid
    proc.terminate()
    assert proc.wait(timeout=30) == 7
    assert marker.read_text() == "terminated"


def test_a_job_killed_outright_has_its_child_terminated(server, job, tmp_path):
    marker = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, str(job), "wait", str(marker)], stdout=subprocess.PIPE, text=True,
                            env=_env(server))
    child = json.loads(proc.stdout.readline())["pid"]
    proc.kill()  # SIGKILL: no forwarding; the server sees the connection close
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "terminated"
    _wait_gone(child)


def test_without_a_usable_server_the_job_runs_in_its_own_process(job, tmp_path):
    for path, says in ((None, ""), (str(tmp_path / "none.sock"), "not usable")):
        env = {k: v for k, v in _env(path or "").items() if k != forkserver.ENV or path}
        out = subprocess.run([sys.executable, str(job), "0"], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        seen = _read(out.stdout)
        assert seen["worker"] is False and seen["pid"] != os.getpid()
        assert says in out.stderr


def test_another_interpreter_is_refused(server, job):
    """A job of another Python (a conda environment) must not run in the server's: the
    server refuses it, and delegate() then returns to run the job in its own process."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server)
    forkserver._send(conn, {"argv": [str(job), "0"], "cwd": "/", "env": {}, "executable": "/other/python",
                            "prefix": "/other"}, fds=[0, 1, 2])
    assert "refused" in forkserver._recv(conn)
    conn.close()


def test_the_server_exits_with_the_process_that_started_it(tmp_path):
    """A starter killed outright (no stop()) does not leave its server behind."""
    code = ("import sys, time; from spbench import forkserver; "
            f"proc, path = forkserver.start({str(tmp_path)!r}, preload=()); print(proc.pid, flush=True); time.sleep(60)")
    starter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server_pid = int(starter.stdout.readline())
    starter.kill()
    starter.wait()
    _wait_gone(server_pid)
    assert not list(Path(tmp_path).glob("*.sock"))


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # a zombie of a process we did not start is reaped by init; ours by the server
        if _is_zombie(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


def test_sigkill_of_the_server_fails_the_waiting_job(job, tmp_path):
    proc_server, path = forkserver.start(tmp_path / "s", preload=())
    marker = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, str(job), "wait", str(marker)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(path))
    proc.stdout.readline()
    proc_server.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    assert "lost the server" in proc.stderr.read()
    deadline = time.monotonic() + 30  # the job stopped its orphaned child
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "terminated"
    forkserver.stop(proc_server, path)


def test_a_preload_that_starts_a_thread_is_not_served(tmp_path, monkeypatch):
    """A fork keeps only the forking thread: a module whose import starts another would leave
    its locks to hang in every job, so the server refuses to serve (the jobs run in their own
    processes)."""
    (tmp_path / "threaded_module.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True, name='sleeper').start()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(RuntimeError, match="exited"):
        forkserver.start(tmp_path / "s", preload=("threaded_module",), timeout_s=60)
