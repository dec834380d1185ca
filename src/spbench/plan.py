"""What a grid will cost before it is launched: job counts and GPU-hours.

``python -m spbench.plan config.yaml`` prints the jobs of each kind and two GPU-hour figures
for the fine-tunes: the allocation asked of the scheduler (jobs × GPUs × ``cluster.runtime``,
an upper bound) and an estimate from the wall seconds of runs already recorded under
``results/runs`` (scaled by steps), when there are any.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Mapping

from .config import candidates, expand_runs, load_config
from .methods import method_class

__all__ = ["plan", "format_plan", "main"]


def plan(config: Mapping[str, Any], measured: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Job counts of the validated ``config`` and its fine-tunes' GPU-hours. ``measured``:
    records of earlier runs (their ``wall_seconds`` per step gives the estimate)."""
    # Before selection has run its outcome is unknown, but not the number of runs it leads to:
    # count with the first candidate of each tuned method.
    runs = list(expand_runs(config, lambda source, target, method: candidates(config, method)[0]))
    sources = sorted({r.source for r in runs})
    tasks = sorted({r.target for r in runs} | {config["sources"][s]["task"] for s in sources})
    fisher = sorted({r.source for r in runs if method_class(r.method).needs.fisher})
    cluster, steps = config["cluster"], config["finetune"]["steps"]
    gpus = max(cluster["gpus"], 1)
    out: dict[str, Any] = {
        "jobs": {"prepare_task": len(tasks), "source": len(sources), "estimate_fisher": len(fisher), "finetune": len(runs)},
        "requested_gpu_hours": len(runs) * gpus * cluster["runtime"] / 60,
        "estimated_gpu_hours": None,
        "measured_runs": 0,
        "unit": "GPU-hours" if cluster["gpus"] else "device-hours",  # CPU-only jobs: one device each
    }
    per_step = [r["wall_seconds"] / r["steps"] for r in measured or [] if r.get("steps")]
    if per_step:
        out["measured_runs"] = len(per_step)
        out["estimated_gpu_hours"] = len(runs) * gpus * statistics.median(per_step) * steps / 3600
    return out


def format_plan(p: Mapping[str, Any]) -> str:
    jobs = p["jobs"]
    lines = [f"{name:16s} {count:6d} jobs" for name, count in jobs.items()]
    lines.append(f"{'total':16s} {sum(jobs.values()):6d} jobs")
    lines.append(f"fine-tunes: {p['requested_gpu_hours']:.2f} {p['unit']} requested (cluster.runtime per job, an upper bound)")
    if p["estimated_gpu_hours"] is not None:
        lines.append(f"fine-tunes: {p['estimated_gpu_hours']:.2f} {p['unit']} estimated from {p['measured_runs']} recorded runs")
    else:
        lines.append("fine-tunes: no recorded runs to estimate from (run a few first)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .results import read_record

    parser = argparse.ArgumentParser(prog="python -m spbench.plan", description="Job count and GPU-hours of a grid.")
    parser.add_argument("config", type=Path, nargs="?", default=Path("config.yaml"))
    args = parser.parse_args(argv)
    config = load_config(args.config)
    records = [read_record(p) for p in Path(config["results"], "runs").rglob("record.json")]
    print(format_plan(plan(config, records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
