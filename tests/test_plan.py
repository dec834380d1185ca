"""The cost plan of a grid: job counts per kind and GPU-hours, before anything runs."""

from __future__ import annotations

import json
import re
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
    # a job per run group: the 2 replicates of each main setting share one
    assert p["jobs"] == {"prepare_task": 2, "source": 1, "estimate_fisher": 1, "finetune": 13}
    assert p["finetune_runs"] == 18
    assert {k: v["runs"] for k, v in p["parts"].items()} == {"selection": 2, "main": 10, "figures": 6}
    assert p["parts"]["main"]["images"] == 10 * 10 * 32  # runs × steps × batch
    assert p["requested_gpu_hours"] == pytest.approx(18 * 10 / 60)  # 18 jobs × 10 min, one device each
    assert p["estimates"] == []
    assert "no measured throughput" in format_plan(p)


def bench(device: str, arch: str, **rates) -> dict:
    """A benchmarks/train_throughput.py --json output, reduced to what the plan reads."""
    return {"device_name": device, "arch": arch, "image_size": 224, "batch": 64,
            "rows": [{"precision": prec, "spbench_images_per_s": rate} for prec, rate in rates.items()]}


def test_device_hours_from_benchmarks_and_records():
    """Each part's hours are its runs' training images over the images per second measured for
    their architecture, per device and precision; a device without a measurement for some
    architecture has no total."""
    config = load_config(REPO / "config" / "tiny.yaml")  # demo_resnet, 10 steps × batch 32
    images = {k: v["images"] for k, v in plan(config)["parts"].items()}
    records = [{"device": "cpu: test", "arch": "demo_resnet", "precision": "fp32", "images_per_second": v}
               for v in (100.0, 300.0, 200.0)]
    p = plan(config, records, [bench("GPU X", "demo_resnet", bf16=3600.0, fp32=1800.0), bench("GPU Y", "resnet50", bf16=1.0)])
    by = {(e["device"], e["precision"]): e for e in p["estimates"]}
    assert set(by) == {("cpu: test", "fp32"), ("GPU X", "bf16"), ("GPU X", "fp32"), ("GPU Y", "bf16")}
    cpu = by[("cpu: test", "fp32")]
    assert cpu["rates"]["demo_resnet"]["images_per_second"] == 200.0  # the median of the records
    assert cpu["hours"] == pytest.approx({k: n / 200.0 / 3600 for k, n in images.items()})
    assert by[("GPU X", "bf16")]["total"] == pytest.approx(sum(images.values()) / 3600.0 / 3600)
    assert by[("GPU Y", "bf16")]["total"] is None and by[("GPU Y", "bf16")]["missing_archs"] == ["demo_resnet"]
    text = format_plan(p)
    assert "GPU X" in text and "no measurement for demo_resnet" in text
    # a config that fixes its precision is priced at that precision only
    config["finetune"]["precision"] = "bf16"
    assert {e["precision"] for e in plan(config, records, [bench("GPU X", "demo_resnet", bf16=1.0, fp32=1.0)])["estimates"]} == {"bf16"}


def test_runs_with_frozen_units_are_priced_at_their_depths_rate():
    """Frozen units run no backward, so Fig. 3's runs train faster: a depth's recorded rate
    prices that depth's runs and stays out of the full fine-tune's rate; a depth never recorded
    is priced at the deepest recorded depth below it, else at the full fine-tune's rate (an
    upper bound on its time either way); a deeper depth's rate never prices it."""
    config = load_config(REPO / "config" / "tiny.yaml")  # Fig. 3: 2 runs at depth 2, 10 steps × batch 32
    p0 = plan(config)
    frozen = p0["parts"]["figures"]["frozen_images"]
    assert frozen == 2 * 10 * 32
    rest = {k: v["images"] - (frozen if k == "figures" else 0) for k, v in p0["parts"].items()}
    records = [{"device": "cpu: t", "arch": "demo_resnet", "precision": "fp32", "freeze": 0, "images_per_second": 100.0},
               {"device": "cpu: t", "arch": "demo_resnet", "precision": "fp32", "freeze": 2, "images_per_second": 400.0},
               {"device": "cpu: t", "arch": "demo_resnet", "precision": "fp32", "freeze": 2, "images_per_second": 600.0},
               {"device": "cpu: t", "arch": "demo_resnet", "precision": "fp32", "freeze": 3, "images_per_second": 9e9}]
    (e,) = plan(config, records)["estimates"]
    assert e["rates"]["demo_resnet"]["images_per_second"] == 100.0  # not the median of all four
    # depth 3: no run there, and too deep to price depth 2
    assert e["frozen_rates"] == {"demo_resnet/freeze2": {"images_per_second": 500.0, "n": 2, "from": "recorded runs"}}
    expected = {k: (n / 100.0 + (frozen / 500.0 if k == "figures" else 0)) / 3600 for k, n in rest.items()}
    assert e["hours"] == pytest.approx(expected)
    text = format_plan(plan(config, records))
    assert "demo_resnet, freeze 2: 500.0 images/s from recorded runs (median of 2)" in text
    # without a record of depth 2, its runs cost what a full fine-tune costs
    (e,) = plan(config, records[:1])["estimates"]
    assert e["frozen_rates"] == {} and e["hours"]["figures"] == pytest.approx(p0["parts"]["figures"]["images"] / 100.0 / 3600)
    assert "priced at the rate measured at their depth, else at the deepest depth measured below it, at worst the full" \
        in format_plan(plan(config, records[:1]))
    # a shallower depth's rate prices depth 2 when depth 2 itself was never measured
    shallower = records[:1] + [dict(records[1], freeze=1, images_per_second=250.0)] + records[3:]
    (e,) = plan(config, shallower)["estimates"]
    assert list(e["frozen_rates"]) == ["demo_resnet/freeze1"]
    assert e["hours"]["figures"] == pytest.approx((rest["figures"] / 100.0 + frozen / 250.0) / 3600)
    # a device whose only records have frozen units has no full fine-tune rate: no total
    (e,) = plan(config, records[1:3])["estimates"]
    assert e["total"] is None and e["missing_archs"] == ["demo_resnet"]


def test_halving_is_priced_rung_by_rung():
    """With selection.halving the selection's runs are counted per rung at their own steps."""
    from spbench.config import validate_config
    import yaml

    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    full = plan(validate_config(config))["parts"]["selection"]
    config["selection"]["halving"] = {"eta": 3, "rungs": 3}
    halved = plan(validate_config(config))["parts"]["selection"]
    # per (source, target, method, lr) grid: 20 candidates × 3 lr = 60 per (source, target)
    # spread over the methods; rungs keep ceil(n/3) of each method's candidates
    sizes = {"l2": 9, "l2_sp": 12, "l2_sp_fisher": 12, "l1_sp": 9, "gl_sp": 9, "gl_sp_fisher": 9}
    from spbench.config import rung_sizes

    runs = sum(sum(rung_sizes(n, 3, 3)) for n in sizes.values()) * 8  # 2 sources × 4 targets
    images = sum(sum(s * b for s, b in zip(rung_sizes(n, 3, 3), (1000, 3000, 9000))) for n in sizes.values()) * 8 * 64
    assert halved["runs"] == runs and halved["images"] == images
    assert full["runs"] == 480 and full["images"] == 480 * 9000 * 64
    assert halved["images"] < full["images"] / 2.5


def test_plan_command_prints_the_demo_grid(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, check=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    # 21 trainings × 2 folds (18 candidates; WiSE-FT: one per target), 15 methods × 3 targets × 5 replicates,
    # Fig. 1's 8 and Fig. 3's 8 runs;
    # a job per candidate, per main setting, per figure run
    assert "finetune             82 jobs (283 runs, by run group)" in proc.stdout
    assert "requested: 283.00 GPU-hours (cluster.runtime per job" in proc.stdout
    for part in ("selection", "main", "figures"):
        assert re.search(rf"^  {part} +\d+ runs", proc.stdout, re.M), part


def test_plan_command_reads_overlays_and_throughput(tmp_path):
    """`python -m spbench.plan base.yaml overlay.yaml --throughput bench.json`: the overlay merged as
    snakemake merges config files, the benchmark's device priced."""
    import json

    (tmp_path / "bench.json").write_text(json.dumps(bench("GPU X", "demo_resnet", fp32=1000.0)))
    (tmp_path / "halving.yaml").write_text("selection: {halving: {eta: 2, rungs: 2}}\n")
    proc = subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config" / "tiny.yaml"), "halving.yaml",
                           "--throughput", "bench.json"], cwd=tmp_path, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert "successive halving: eta 2, 2 rungs" in proc.stdout
    # several files after one --throughput (a shell glob of on_device.sh's outputs)
    (tmp_path / "bench2.json").write_text(json.dumps(bench("GPU Y", "demo_resnet", fp32=500.0)))
    both = subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config" / "tiny.yaml"), "--throughput",
                           "bench.json", "bench2.json"], cwd=tmp_path, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert "GPU X" in both.stdout and "GPU Y" in both.stdout
    late = subprocess.run([sys.executable, "-m", "spbench.plan", "--throughput", "bench.json", "halving.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert late.returncode == 2 and "name the configs before --throughput" in late.stderr
    assert re.search(r"^  GPU X +fp32 ", proc.stdout, re.M) and "1,000.0 images/s from benchmark" in proc.stdout
    (tmp_path / "bad.json").write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config" / "tiny.yaml"), "--throughput",
                          "bad.json"], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert bad.returncode == 2 and "not a benchmarks/train_throughput.py --json output" in bad.stderr


def test_fisher_jobs_follow_the_methods_needs():
    """A Fisher job per source only when some method of the grid needs the Fisher diagonal."""
    config = load_config(REPO / "config" / "tiny.yaml")
    config["grid"]["methods"] = {"none": {}, "l2_sp": {"alpha": [0.01]}, "lwf": {}, "bss": {}}
    config.pop("figures")
    p = plan(config)
    assert p["jobs"] == {"prepare_task": 2, "source": 1, "estimate_fisher": 0, "finetune": 4}
    assert p["finetune_runs"] == 4 * 2
    config["grid"]["methods"]["l2_sp_fisher"] = {"alpha": [0.01]}
    assert plan(config)["jobs"]["estimate_fisher"] == 1


def test_plan_command_defaults_to_config_yaml():
    """Without a config argument the plan prices ./config.yaml (the demo, from the checkout root)."""
    proc = subprocess.run([sys.executable, "-m", "spbench.plan"], cwd=REPO, capture_output=True, text=True,
                          check=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert "finetune             82 jobs (283 runs, by run group)" in proc.stdout


def test_plan_prices_the_tllib_config():
    """config/tllib.yaml: 7 methods × 6 targets (CUB, Cars, Aircraft at 15 % and 100 %), every
    candidate × 3 learning rates on one fold, then 5 replicates at the chosen setting; priced
    from a ResNet-50 measurement."""
    config = load_config(REPO / "config" / "tllib.yaml")
    candidates = {"none": 1, "l2": 2, "l2_sp": 3, "lwf": 3, "bss": 1, "delta": 2, "co_tuning": 1}
    p = plan(config, [], [bench("GPU X", "resnet50", bf16=2000.0)])
    selection = sum(candidates.values()) * 3 * 6
    assert {k: v["runs"] for k, v in p["parts"].items()} == {"selection": selection, "main": 7 * 6 * 5, "figures": 0}
    images = (selection + 210) * 9000 * 64
    (estimate,) = p["estimates"]
    assert estimate["total"] == pytest.approx(images / 2000.0 / 3600)
    assert "GPU X" in format_plan(p)


@pytest.mark.parametrize("overlay, sources, targets", [("finegrained.yaml", 1, 12), ("backbones.yaml", 3, 6)])
def test_tllib_overlays_validate_and_scale_the_grid(overlay, sources, targets):
    """config/finegrained.yaml adds Pets, Flowers-102 and DTD (15 % and 100 %) with their downloads;
    config/backbones.yaml adds ViT-B/16 and ConvNeXt-Tiny sources: the grid grows by that factor."""
    base = plan(load_config(REPO / "config" / "tllib.yaml"))
    grown = plan(load_config(REPO / "config" / "tllib.yaml", REPO / "config" / overlay))
    assert grown["finetune_runs"] == base["finetune_runs"] * sources * targets // 6


def test_a_cpu_benchmark_and_the_records_of_that_cpu_are_one_device(tmp_path):
    """The run records and benchmarks/train_throughput.py name a device the same way
    (spbench.pipeline.device_name: on the CPU its model and thread count), so the plan prices
    both under one device; another thread count is another device. Its --freeze rows price the
    runs of their depth (tiny.yaml's Fig. 3 freezes 2 units)."""
    import importlib.util

    import torch

    from spbench.pipeline import device_name

    spec = importlib.util.spec_from_file_location("_bench_tt_plan", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "throughput.json"
        assert module.main(["--quick", "--threads", "1", "--precisions", "fp32", "--freeze", "0,2",
                            "--json-file", str(out)]) == 0
        measured = json.loads(out.read_text())
        torch.set_num_threads(1)
        one = device_name(torch.device("cpu"))
        torch.set_num_threads(2)
        two = device_name(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert measured["device_name"] == one and one != two and one.startswith("cpu: ")
    config = load_config(REPO / "config" / "tiny.yaml")
    records = [{"device": one, "arch": "demo_resnet", "precision": "fp32", "images_per_second": 50.0},
               {"device": two, "arch": "demo_resnet", "precision": "fp32", "images_per_second": 80.0}]
    p = plan(config, records, [measured])
    by = {(e["device"], e["precision"]): e for e in p["estimates"]}
    assert set(by) == {(one, "fp32"), (two, "fp32")}
    assert by[(one, "fp32")]["rates"]["demo_resnet"]["from"].startswith("benchmark")  # the benchmark is preferred
    row = {r["freeze"]: r for r in measured["rows"]}
    frozen = by[(one, "fp32")]["frozen_rates"]["demo_resnet/freeze2"]
    assert frozen["images_per_second"] == row[2]["spbench_images_per_s"] and frozen["from"].startswith("benchmark")
    assert by[(two, "fp32")]["frozen_rates"] == {}  # only records of depth 0 there


def test_a_config_is_priced_at_the_rates_of_its_own_compile_setting(tmp_path):
    """finetune.compile changes the speed: benchmarks (their ``compile``) and records (their
    resolved config) measured with the other setting do not price a config; the command says
    which --throughput file it leaves out."""
    config = load_config(REPO / "config" / "tiny.yaml")
    eager = {"device": "cpu: t", "arch": "demo_resnet", "precision": "fp32", "images_per_second": 100.0,
             "config_json": json.dumps({"finetune": {"compile": False}})}
    compiled = dict(eager, images_per_second=300.0, config_json=json.dumps({"finetune": {"compile": True}}))
    bench_compiled = dict(bench("GPU X", "demo_resnet", bf16=900.0), compile=True)
    bench_eager = bench("GPU X", "demo_resnet", bf16=500.0)  # an output of before --compile: eager

    def rates(cfg):
        return {(e["device"], e["precision"]): e["rates"]["demo_resnet"]["images_per_second"]
                for e in plan(cfg, [eager, compiled], [bench_compiled, bench_eager])["estimates"]}

    assert rates(config) == {("cpu: t", "fp32"): 100.0, ("GPU X", "bf16"): 500.0}
    config["finetune"]["compile"] = True
    assert rates(config) == {("cpu: t", "fp32"): 300.0, ("GPU X", "bf16"): 900.0}
    assert "of compiled backbones (finetune.compile)" in format_plan(plan(config, [compiled]))
    (tmp_path / "bench.json").write_text(json.dumps(bench_compiled))
    out = subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config" / "tiny.yaml"), "--throughput",
                          "bench.json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "bench.json was measured with --compile, the config has finetune.compile: false: not used" in out.stderr
    assert "no measured throughput" in out.stdout


def test_a_budget_gives_the_rate_a_job_must_average(tmp_path):
    """--budget H: the grid's training images over H device-hours (per device of a job)."""
    config = load_config(REPO / "config" / "tiny.yaml")
    p = plan(config, budget_hours=2.0)
    images = sum(part["images"] for part in p["parts"].values())
    assert images == 18 * 10 * 32 and p["budget"] == {"hours": 2.0, "images": images,
                                                      "images_per_second": pytest.approx(images / 7200)}
    config["cluster"]["gpus"] = 4  # a job holds 4 devices: it must go 4 times as fast
    assert plan(config, budget_hours=2.0)["budget"]["images_per_second"] == pytest.approx(4 * images / 7200)
    assert "budget" not in plan(config)
    run = lambda *a: subprocess.run([sys.executable, "-m", "spbench.plan", str(REPO / "config" / "tiny.yaml"), *a],
                                    cwd=tmp_path, capture_output=True, text=True)
    out = run("--budget", "0.5")
    assert out.returncode == 0 and "budget: 0.5 device-hours need 3 training images/s per job on average" in out.stdout
    for bad in ("0", "-1", "inf", "nan"):
        assert run("--budget", bad).returncode == 2, bad
