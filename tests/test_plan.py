"""The cost plan of a grid: job counts per kind and GPU-hours, before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spbench.config import load_config
from spbench.plan import format_plan, plan

REPO = Path(__file__).resolve().parents[1]


def test_plan_of_the_tiny_grid():
    config = load_config(REPO / "config" / "tiny.yaml")
    p = plan(config)
    # 2 selection runs (l2_sp's two α), 5 methods × 2 replicates, Fig. 1's 2 × 2 grid, Fig. 3's 2 runs
    assert p["jobs"] == {"prepare_task": 2, "source": 1, "estimate_fisher": 1, "finetune": 18}
    assert p["requested_gpu_hours"] == pytest.approx(18 * 10 / 60)  # 18 jobs × 10 min, one device each
    assert p["estimated_gpu_hours"] is None
    measured = [{"wall_seconds": 3.0, "steps": 10}, {"wall_seconds": 1.0, "steps": 10}, {"wall_seconds": 2.0, "steps": 10}]
    p = plan(config, measured)
    assert p["estimated_gpu_hours"] == pytest.approx(18 * 0.2 * 10 / 3600)
    assert "22 jobs" in format_plan(p) and "estimated from 3 recorded runs" in format_plan(p)


def test_plan_command_prints_the_demo_grid(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, check=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    # 18 selection runs, 11 methods × 3 targets × 3 replicates, Fig. 1's 8 and Fig. 3's 8 runs
    assert "finetune            133 jobs" in proc.stdout
    assert "133.00 GPU-hours requested" in proc.stdout


def test_fisher_jobs_follow_the_methods_needs():
    """A Fisher job per source only when some method of the grid needs the Fisher diagonal."""
    config = load_config(REPO / "config" / "tiny.yaml")
    config["grid"]["methods"] = {"none": {}, "l2_sp": {"alpha": [0.01]}, "lwf": {}, "bss": {}}
    config.pop("figures")
    p = plan(config)
    assert p["jobs"] == {"prepare_task": 2, "source": 1, "estimate_fisher": 0, "finetune": 4 * 2}
    config["grid"]["methods"]["l2_sp_fisher"] = {"alpha": [0.01]}
    assert plan(config)["jobs"]["estimate_fisher"] == 1
