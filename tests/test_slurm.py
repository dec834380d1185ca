"""The workflow on a real Slurm cluster: a single-node slurmctld + slurmd (with munge) on
127.0.0.1, started for this module and stopped after it; `snakemake --profile slurm` runs a
small grid through snakemake-executor-plugin-slurm.

Without Slurm accounting (no slurmdbd) job states come from `squeue`, so MinJobAge is kept far
above the plugin's first status check; the plugin's job steps drop SLURM_CONF, so the
configuration must be /etc/slurm/slurm.conf (an existing one that is not ours is refused).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spbench.results import read_parquet

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# spbench test cluster"
STATUS_EVERY_S = 3  # the plugin's first status check and interval; MinJobAge is 300 s

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def _install() -> None:
    """Install slurm-wlm and munge with the project's script, or skip where that cannot work."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get): tests/cluster/install.sh")
    subprocess.run(["bash", str(REPO / "tests" / "cluster" / "install.sh")], check=True, stdin=subprocess.DEVNULL)


def _slurm_conf(state: Path, host: str, cpus: int, memory_mb: int) -> str:
    return f"""{MARKER}: written by tests/test_slurm.py, removed after it
ClusterName=spbench
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_idle(timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.strip()
        if out == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Slurm node did not become idle (sinfo says {out!r})")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    _install()
    # One test cluster per machine at a time: it owns /etc/slurm/slurm.conf and two ports.
    lock = open("/tmp/spbench-slurm-test.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    if SLURM_CONF.exists() and not SLURM_CONF.read_text().startswith(MARKER):
        pytest.skip(f"{SLURM_CONF} belongs to a real Slurm installation; not replacing it")
    state = tmp_path_factory.mktemp("slurm")
    for sub in ("ctld", "d"):
        (state / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_slurm_conf(state, host, os.cpu_count() or 1, memory_mb))
    procs: list[subprocess.Popen] = []
    munge_pid = None
    try:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged yet
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
            munge_pid = int(Path("/run/munge/munged.pid").read_text())
        for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            log = open(state / f"{cmd[0]}.out", "w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        _wait_idle()
        yield state
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if munge_pid is not None:
            os.kill(munge_pid, 15)
        SLURM_CONF.unlink(missing_ok=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def small_grid(workdir: Path) -> Path:
    """config/tiny.yaml on one replicate and two methods (one with Fisher), l2_sp_fisher's α
    chosen between two values on a training fold (`none` has one candidate: no selection)."""
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["grid"]["replicates"] = 1
    config["grid"]["methods"] = {"none": {}, "l2_sp_fisher": {"alpha": [0.01, 0.1], "beta": [0.01]}}
    config.pop("figures", None)
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_profile_runs_the_workflow_on_slurm(slurm_cluster, tmp_path):
    """`snakemake --profile slurm` (the README's command, from the checkout) sends the heavy
    rules to Slurm, packs the fine-tunes of model selection into one allocation and those of
    the main grid into another, chooses the setting locally, and finishes the workflow."""
    configfile = small_grid(tmp_path)
    cmd = [
        SNAKEMAKE, "--profile", "slurm", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
        "--configfile", str(configfile),
        # this cluster has no accounting database: squeue for states, no account to guess
        "--slurm-status-command", "squeue", "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", str(STATUS_EVERY_S),
        "--seconds-between-status-checks", str(STATUS_EVERY_S),
        "--group-components", "finetunes=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    runs = read_parquet(tmp_path / "results" / "runs.parquet")
    main = "main/digits-src/digits-mod3-k5"
    selected = json.loads((tmp_path / "results" / "selection" / "digits-src" / "digits-mod3-k5" / "l2_sp_fisher.json").read_text())
    alpha = selected["selected"]["alpha"]
    assert alpha in (0.01, 0.1)
    assert sorted(runs.loc[runs["evaluation"] == "test", "run_key"]) == [
        f"{main}/l2_sp_fisher/alpha={alpha}_beta=0.01_lr=0.01/freeze0/test/rep0", f"{main}/none/lr=0.01/freeze0/test/rep0"]
    assert sorted(runs.loc[runs["evaluation"] == "val0", "setting"]) == ["alpha=0.01_beta=0.01_lr=0.01",
                                                                       "alpha=0.1_beta=0.01_lr=0.01"]
    assert (tmp_path / "reports" / "table2.md").exists()
    # pretrain_source, estimate_fisher, the two selection runs (one allocation) and the two
    # main-grid fine-tunes (another) went through sbatch; the light rules ran here
    submitted = [line for line in log.splitlines() if "has been submitted with SLURM jobid" in line]
    assert len(submitted) == 4, "\n".join(submitted)
    assert [("finetune_select" in line, "finetune_main" in line) for line in submitted if "group_finetunes" in line] == [
        (True, False), (False, True)]
    for rule in ("prepare_task", "init_tracking", "aggregate", "report"):
        assert f"localrule {rule}:" in log, rule
    assert "localcheckpoint select_setting:" in log
    # Slurm ran them: finished jobs stay listed for MinJobAge (300 s)
    states = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    ids = {re.search(r"SLURM jobid (\d+)", line).group(1) for line in submitted}
    done = {i for i, s in (line.split() for line in states.stdout.splitlines()) if s == "COMPLETED"}
    assert ids <= done, states.stdout
