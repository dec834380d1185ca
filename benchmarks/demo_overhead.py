#!/usr/bin/env python
"""What the workflow costs beyond the training it runs: the demo's wall time against its
fine-tunes' in-job time.

Runs the real workflow (`snakemake --cores N`, this checkout's Snakefile) on a config (default:
the demo's config.yaml) in a fresh temporary folder, times the whole command, then reads
results/runs.parquet: the fine-tunes' in-job time is the sum of their ``wall_seconds`` (from the
start of training to the record, evaluation included). Reported:

  wall         seconds of the snakemake command (DAG, every job, the reports)
  in-job       sum of the fine-tunes' wall_seconds, and that sum divided by the cores: the
               wall time that perfect packing of the fine-tunes alone would take
  ratio        wall / (in-job / cores): 1.0 means no cost beyond the fine-tunes' own time
  scheduler    CPU seconds of the snakemake process itself (DAG, checkpoints' re-evaluation,
               job dispatch), which share the cores with the jobs
  calibration  milliseconds per training step of the demo network (batch 32, 16 px, one
               thread, plain SGD), timed before the workflow: machines of the same name differ
               by more than 2x, and this says which kind of machine the numbers come from

Run it on an otherwise idle machine: other load inflates both numbers unevenly.

Usage:  python benchmarks/demo_overhead.py [--config config.yaml] [--cores 2] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml", help="the workflow config (default: the demo's)")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="snakemake --cores (default: all)")
    ap.add_argument("--keep", type=Path, help="run in this folder (must not exist) and keep it; default: a temporary one")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


def run_workflow(config: Path, cores: int, workdir: Path) -> tuple[float, int, str]:
    """Run snakemake on ``config`` in ``workdir``; (wall seconds, jobs done, its output)."""
    shutil.copy(config, workdir / config.name)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", config.name,
           "--cores", str(cores)]
    env = {**os.environ, "SPBENCH_PROGRESS": "log"}
    began = time.perf_counter()
    with open(workdir / "snakemake.stderr", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        scheduler_cpu = _own_cpu_seconds(proc)
        wall = time.perf_counter() - began
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed ({proc.returncode}):\n{stderr[-4000:]}")
    done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", stderr)
    return wall, int(done[-1][0]) if done else 0, scheduler_cpu


def _own_cpu_seconds(proc: subprocess.Popen) -> float:
    """Wait for ``proc``; the CPU seconds (user + system) of that process itself, without its
    children (the jobs), sampled every 0.2 s until it exits (the last sample, up to 0.2 s
    before its end)."""
    import psutil  # a dependency of snakemake

    watched, cpu = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            times = watched.cpu_times()
            cpu = times.user + times.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    proc.wait()
    return cpu


def calibrate(steps: int = 100) -> float:
    """Median milliseconds of a plain training step of the demo network (batch 32, 16x16, one
    thread), in a fresh interpreter, over 3 rounds of ``steps`` after a warm-up round."""
    code = f"""
import statistics, time, torch
from spbench.models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model("demo_resnet", 3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 3, (32,))
rounds = []
for _ in range(4):
    began = time.perf_counter()
    for _ in range({steps}):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    rounds.append((time.perf_counter() - began) / {steps} * 1000)
print(statistics.median(rounds[1:]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def measure(config: Path, cores: int, workdir: Path) -> dict:
    from spbench.pipeline import cpu_model
    from spbench.results import read_parquet

    calibration = calibrate()
    wall, jobs, scheduler_cpu = run_workflow(config, cores, workdir)
    runs = read_parquet(workdir / "results" / "runs.parquet")
    # one row per training: a validation run that scored several post-hoc values (WiSE-FT's a)
    # has a row per value, all with its one config (which names the run)
    runs = runs.drop_duplicates("config_json")
    in_job = float(runs["wall_seconds"].sum())
    return {
        "config": str(config),
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} logical CPUs",
        "calibration_step_ms": calibration,
        "cores": cores,
        "jobs": jobs,
        "finetunes": len(runs),
        "wall_s": wall,
        "in_job_s": in_job,
        "median_in_job_s": float(runs["wall_seconds"].median()),
        "in_job_per_core_s": in_job / cores,
        "ratio": wall / (in_job / cores),
        "scheduler_cpu_s": scheduler_cpu,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True)
        result = measure(args.config.resolve(), args.cores, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="spbench-demo-") as tmp:
            result = measure(args.config.resolve(), args.cores, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"demo_overhead: {result['config']} on {result['machine']}, snakemake --cores {result['cores']}")
    print(f"jobs {result['jobs']}, fine-tunes {result['finetunes']} (median in-job {result['median_in_job_s']:.1f} s)")
    print(f"wall                     {result['wall_s']:8.1f} s")
    print(f"in-job (sum)             {result['in_job_s']:8.1f} s")
    print(f"in-job / cores           {result['in_job_per_core_s']:8.1f} s")
    print(f"ratio wall / (in-job / cores)  {result['ratio']:.2f}")
    print(f"snakemake's own CPU time {result['scheduler_cpu_s']:8.1f} s (the scheduler itself, not its jobs)")
    print(f"calibration              {result['calibration_step_ms']:8.1f} ms per demo-network training step "
          "(batch 32, 1 thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
