"""What a grid will cost before it is launched: job counts and device-hours.

``python -m spbench.plan config.yaml`` prints the jobs of each kind, the fine-tunes of each part
of the study (model selection, the main grid, the figures) with the training images they
process, and device-hours for them:

- *requested*: jobs × GPUs × ``cluster.runtime``, what the scheduler is asked for (an upper
  bound);
- *estimated*, per device type: each run's training images (steps × batch size) divided by the
  images per second measured on that device for the run's architecture, precision and freeze
  depth. The measurements come from ``benchmarks/train_throughput.py --json`` outputs
  (``--throughput FILE``, spbench's real training step, at each of its ``--freeze`` depths) and
  from the runs already recorded under ``results/runs`` (their ``images_per_second``).
  Evaluation passes are not counted.

A run with frozen units (``freeze`` > 0, Fig. 3) trains faster than a full fine-tune: its frozen
units run no backward. It is priced at the rate measured at its depth on that device, else at
the rate of the deepest depth below it that was measured (the full fine-tune's, depth 0, when
none was): freezing more units only removes work, so its time is then an upper bound. Rates
measured with frozen units never enter the full fine-tune's rate.

Only the rates measured with the config's own ``finetune.compile`` price it (a benchmark's
``compile``, a record's resolved config).

With ``selection.halving`` the selection's rungs are counted exactly (how many candidates each
rung trains does not depend on which survive).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import RunSpec, candidates, expand_runs, first_survivors, halving_budgets, load_config
from .methods import method_class

__all__ = ["plan", "format_plan", "throughput_table", "main", "PARTS"]

#: The parts of the study, by the experiments that make them up.
PARTS = {"selection": ("select",), "main": ("main",), "figures": ("alpha_beta", "freeze")}


def throughput_table(benchmarks: Iterable[Mapping[str, Any]] = (), records: Iterable[Mapping[str, Any]] = (),
                     compiled: bool = False) -> dict:
    """Measured training images per second, as ``{(device, arch, precision, freeze): (images/s,
    n, where)}``, of the measurements made with a compiled backbone or without (``compiled``:
    ``finetune.compile``).

    ``benchmarks``: outputs of ``benchmarks/train_throughput.py --json`` (each row's
    ``spbench_images_per_s``: the real step with its input pipeline, at the row's ``freeze``
    depth; 0 in outputs that predate the option);
    ``records``: run records (the median ``images_per_second`` over the records of one device,
    arch, precision and freeze depth). A benchmark measurement wins over records of the same key."""
    table: dict[tuple[str, str, str, int], tuple[float, int, str]] = {}
    grouped: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for r in records:
        if _compiled(r) != compiled:
            continue
        if r.get("images_per_second") and r.get("device") and r.get("arch"):
            key = (r["device"], r["arch"], r.get("precision") or "fp32", int(r.get("freeze") or 0))
            grouped[key].append(float(r["images_per_second"]))
    for key, values in grouped.items():
        table[key] = (statistics.median(values), len(values), "recorded runs")
    for bench in benchmarks:
        if _bench_compiled(bench) != compiled:
            continue
        for row in bench["rows"]:
            key = (bench["device_name"], bench["arch"], row["precision"], int(row.get("freeze", 0)))
            table[key] = (float(row["spbench_images_per_s"]), 1, f"benchmark ({bench['image_size']} px, batch {bench['batch']})")
    return table


def _bench_compiled(bench: Mapping[str, Any]) -> bool:
    """Whether a train_throughput.py output was measured with --compile (outputs that predate
    the option: no)."""
    return bool(bench.get("compile", False))


def _compiled(record: Mapping[str, Any]) -> bool:
    """Whether a run record's fine-tune compiled its backbone (its resolved config says)."""
    try:
        return bool(json.loads(record.get("config_json") or "{}").get("finetune", {}).get("compile", False))
    except (TypeError, ValueError):
        return False


def _by_arch(by_depth: Mapping[tuple[str, int], int]) -> dict[str, int]:
    """Training images per architecture, summed over the freeze depths."""
    out: dict[str, int] = defaultdict(int)
    for (arch, _), images in by_depth.items():
        out[arch] += images
    return dict(out)


def _part(spec: RunSpec) -> str:
    return next(part for part, experiments in PARTS.items() if spec.experiment in experiments)


def plan(config: Mapping[str, Any], measured: list[Mapping[str, Any]] | None = None,
         benchmarks: list[Mapping[str, Any]] | None = None, budget_hours: float | None = None) -> dict[str, Any]:
    """Job counts of the validated ``config``, its fine-tunes per part with their training
    images, and their device-hours: requested, and estimated per device from ``benchmarks``
    (train_throughput.py outputs) and ``measured`` (records of earlier runs). With
    ``budget_hours``, also the training images per second a job must average for the grid to
    fit in that many device-hours (every image at the same cost: frozen units not discounted)."""
    # Before selection has run its outcome is unknown, but not the number of runs it leads to:
    # count with the first candidate of each tuned method (and the first survivors of each rung).
    survivors = first_survivors(config) if halving_budgets(config) else None
    runs = list(expand_runs(config, lambda source, target, method: candidates(config, method)[0], survivors))
    sources = sorted({r.source for r in runs})
    tasks = sorted({r.target for r in runs} | {config["sources"][s]["task"] for s in sources})
    fisher = sorted({r.source for r in runs if method_class(r.method).needs.fisher})
    cluster, ft = config["cluster"], config["finetune"]
    gpus = max(cluster["gpus"], 1)
    precision = ft.get("precision", "auto")
    parts: dict[str, dict[str, Any]] = {p: {"runs": 0, "images": 0, "by_depth": defaultdict(int)} for p in PARTS}
    for spec in runs:
        images = spec.steps(ft["steps"]) * ft["batch_size"]
        part = parts[_part(spec)]
        part["runs"] += 1
        part["images"] += images
        part["by_depth"][(config["sources"][spec.source]["arch"], spec.freeze)] += images
    table = throughput_table(benchmarks or [], measured or [], compiled=bool(ft.get("compile", False)))
    estimates = []
    for device, prec in sorted({(d, p) for d, _, p, _ in table}):
        if precision not in ("auto", prec):
            continue
        rates = {(arch, depth): r for (d, arch, p, depth), r in table.items() if (d, p) == (device, prec)}
        hours, missing, used = {}, set(), set()
        for name, part in parts.items():
            seconds = 0.0
            for (arch, depth), images in part["by_depth"].items():
                if (arch, 0) not in rates:
                    missing.add(arch)
                    continue
                # the deepest measured depth up to the run's: its own, else an upper bound on its time
                measured_at = max(d for a, d in rates if a == arch and d <= depth)
                seconds += images / rates[(arch, measured_at)][0]
                if measured_at:
                    used.add((arch, measured_at))
            hours[name] = seconds / 3600 * gpus
        estimates.append({"device": device, "precision": prec, "hours": hours,
                          "total": None if missing else sum(hours.values()), "missing_archs": sorted(missing),
                          "rates": {a: {"images_per_second": r, "n": n, "from": w}
                                    for (a, depth), (r, n, w) in rates.items() if depth == 0},
                          "frozen_rates": {f"{a}/freeze{depth}": {"images_per_second": rates[(a, depth)][0],
                                                                  "n": rates[(a, depth)][1], "from": rates[(a, depth)][2]}
                                           for a, depth in sorted(used)}})
    out: dict[str, Any] = {
        # a fine-tune job trains one run group (spbench.config.run_groups)
        "jobs": {"prepare_task": len(tasks), "source": len(sources), "estimate_fisher": len(fisher),
                 "finetune": len({r.group for r in runs})},
        "finetune_runs": len(runs),
        "parts": {name: {"runs": p["runs"], "images": p["images"], "by_arch": _by_arch(p["by_depth"]),
                         "frozen_images": sum(n for (_, depth), n in p["by_depth"].items() if depth)}
                  for name, p in parts.items()},
        "halving": config.get("selection", {}).get("halving"),
        "requested_gpu_hours": len(runs) * gpus * cluster["runtime"] / 60,
        "estimates": estimates,
        "unit": "GPU-hours" if cluster["gpus"] else "device-hours",  # CPU-only jobs: one device each
        "compile": bool(ft.get("compile", False)),  # priced at the rates of compiled backbones only
    }
    if budget_hours is not None:
        total = sum(p["images"] for p in parts.values())
        out["budget"] = {"hours": budget_hours, "images": total,
                         "images_per_second": total * gpus / (budget_hours * 3600)}
    return out


def format_plan(p: Mapping[str, Any]) -> str:
    jobs = p["jobs"]
    lines = [f"{name:16s} {count:6d} jobs" + (f" ({p['finetune_runs']} runs, by run group)" if name == "finetune" else "")
             for name, count in jobs.items()]
    lines.append(f"{'total':16s} {sum(jobs.values()):6d} jobs")
    lines.append("")
    halving = p.get("halving")
    lines.append("fine-tunes" + (f" (selection by successive halving: eta {halving['eta']}, {halving['rungs']} rungs)"
                                 if halving else "") + ":")
    for name, part in p["parts"].items():
        lines.append(f"  {name:10s} {part['runs']:6d} runs  {part['images']:>15,d} training images")
    lines.append(f"requested: {p['requested_gpu_hours']:.2f} {p['unit']} (cluster.runtime per job, an upper bound)")
    if p.get("budget"):
        b = p["budget"]
        lines.append(f"budget: {b['hours']:g} {p['unit']} need {b['images_per_second']:,.0f} training images/s "
                     f"per job on average ({b['images']:,d} images; evaluation not counted)")
    if not p["estimates"]:
        lines.append("estimated: no measured throughput (pass --throughput with a benchmarks/train_throughput.py "
                     "--json output, or run a few fine-tunes first)")
        return "\n".join(lines)
    lines.append(f"estimated {p['unit']} (training images / measured images per second"
                 + (", of compiled backbones (finetune.compile)" if p.get("compile") else "")
                 + "; evaluation not counted):")
    header = f"  {'device':40s} {'precision':9s} " + " ".join(f"{n:>10s}" for n in p["parts"]) + f" {'total':>10s}"
    lines.append(header)
    for e in p["estimates"]:
        total = f"{e['total']:10.2f}" if e["total"] is not None else f"{'n/a':>10s}"
        lines.append(f"  {e['device'][:40]:40s} {e['precision']:9s} "
                     + " ".join(f"{e['hours'][n]:10.2f}" for n in p["parts"]) + f" {total}")
        rates = [(arch, r, r["from"]) for arch, r in sorted(e["rates"].items())]
        rates += [(key.replace("/freeze", ", freeze "), r, r["from"]) for key, r in e["frozen_rates"].items()]
        for label, r, source in rates:
            lines.append(f"      {label}: {r['images_per_second']:,.1f} images/s from {source}"
                         + (f" (median of {r['n']})" if r["n"] > 1 else ""))
        if e["missing_archs"]:
            lines.append(f"      no measurement for {', '.join(e['missing_archs'])} on this device: total n/a")
    frozen = sum(part["frozen_images"] for part in p["parts"].values())
    if frozen:
        lines.append(f"  runs with frozen units ({frozen:,d} training images) are priced at the rate measured at their depth, "
                     "else at the deepest depth measured below it, at worst the full fine-tune's (then an upper bound: "
                     "frozen units run no backward)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .results import read_record

    parser = argparse.ArgumentParser(prog="python -m spbench.plan", description="Job count and device-hours of a grid.")
    parser.add_argument("config", type=Path, nargs="*",
                        help="the config, default config.yaml (several: merged in order, as snakemake "
                             "--configfile merges them)")
    parser.add_argument("--throughput", type=Path, action="extend", nargs="+", default=[], metavar="FILE",
                        help="benchmarks/train_throughput.py --json outputs (one or more, e.g. the "
                             "OUTDIR/*-throughput_*.json of benchmarks/on_device.sh; repeatable)")
    parser.add_argument("--budget", type=float, metavar="HOURS",
                        help="also print the training images/s a job must average to fit in HOURS device-hours")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    for path in args.throughput:
        if path.suffix in (".yaml", ".yml"):
            parser.error(f"--throughput {path}: a config file; name the configs before --throughput")
    config = load_config(*(args.config or [Path("config.yaml")]))
    records = [read_record(p) for p in Path(config["results"], "runs").rglob("record.json")]
    benchmarks = []
    for path in args.throughput:
        try:
            benchmarks.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--throughput {path}: {err}")
        if not {"device_name", "arch", "rows"} <= set(benchmarks[-1]):
            parser.error(f"--throughput {path}: not a benchmarks/train_throughput.py --json output")
        measured_compiled, wanted = _bench_compiled(benchmarks[-1]), bool(config["finetune"]["compile"])
        if measured_compiled != wanted:
            print(f"spbench.plan: --throughput {path} was measured {'with' if measured_compiled else 'without'} "
                  f"--compile, the config has finetune.compile: {str(wanted).lower()}: not used", file=sys.stderr)
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        parser.error(f"--budget: a positive number of hours, not {args.budget:g}")
    p = plan(config, records, benchmarks, budget_hours=args.budget)
    print(json.dumps(p, indent=2, default=str) if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
