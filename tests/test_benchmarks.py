"""Smoke tests of the benchmark scripts in benchmarks/: each runs with ``--quick --json`` on the
demo network and prints one JSON object with the expected keys and positive numbers. No timing
is asserted (the machine may be busy)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from spbench.penalties import PENALTIES

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, capsys) -> dict:
    """Run ``benchmarks/<script> --quick --json --threads 1`` through its ``main(argv)`` in this
    process (a subprocess would pay the torch import again, seconds on a busy machine) and
    parse what it printed."""
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(script).stem}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main(["--quick", "--json", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_penalty_overhead_quick(capsys):
    res = _run("penalty_overhead.py", capsys)
    assert "gl_sp_fisher/prox-torch" not in {row["variant"] for row in res["rows"]}  # the demo network is small
    for key in ("device", "device_name", "torch", "arch", "batch", "image_size", "dtype", "memory_measure", "fisher", "rows"):
        assert key in res, key
    assert res["arch"] == "demo_resnet" and res["image_size"] == 16 and res["channels"] == 1
    rows = {row["variant"]: row for row in res["rows"]}
    expected = set(PENALTIES) | {"baseline_loss_l2_sp", "l1_sp/prox", "gl_sp/prox", "gl_sp_fisher/prox"}
    assert expected <= set(rows)
    for name, row in rows.items():
        for key in ("step_ms", "overhead_pct", "penalty_only_ms", "add_grad_ms", "penalised_elements", "peak_mem_delta_bytes", "state_bytes"):
            assert key in row, (name, key)
        assert _positive(row["step_ms"]), name
        assert math.isfinite(row["overhead_pct"])
        if name != "none":
            assert _positive(row["penalised_elements"]), name
            assert _positive(row["penalty_only_ms"]), name
    assert rows["none"]["overhead_pct"] == 0
    for name in ("l2_sp", "l2_sp_fisher", "baseline_loss_l2_sp"):
        assert _positive(rows[name]["state_bytes"]), name
    # The baseline penalises the same elements as l2_sp.
    assert rows["baseline_loss_l2_sp"]["penalised_elements"] == rows["l2_sp"]["penalised_elements"]
    ratio = res["baseline_over_l2_sp_overhead"]
    assert ratio is None or math.isfinite(ratio)
    assert _positive(res["baseline_over_l2_sp_penalty_only"])


def test_penalty_overhead_sets_the_native_kernel_beside_the_torch_operations(capsys, monkeypatch):
    """Where gl_sp_fisher/prox runs its native kernel, the same map by the torch operations is
    a row beside it, with the kernel's setting restored after each of its steps."""
    import spbench.penalties as penalties

    monkeypatch.setattr(penalties, "NATIVE_MIN_ELEMENTS", 0)
    settings, kernels = [], []
    real = penalties._native_kernel

    def recorded(*args):
        settings.append(penalties.NATIVE)
        kernels.append(real(*args))
        return kernels[-1]

    monkeypatch.setattr(penalties, "_native_kernel", recorded)
    res = _run("penalty_overhead.py", capsys)
    rows = {row["variant"]: row for row in res["rows"]}
    assert _positive(rows["gl_sp_fisher/prox-torch"]["penalty_only_ms"])
    # the prox_ calls of gl_sp_fisher/prox ran the kernel, those of the torch row did not
    assert {(s, k is None) for s, k in zip(settings, kernels)} == {("auto", False), ("never", True)}
    assert rows["gl_sp_fisher/prox-torch"]["penalised_elements"] == rows["gl_sp_fisher/prox"]["penalised_elements"]
    assert penalties.NATIVE == "auto"


def test_fisher_cost_quick(capsys):
    res = _run("fisher_cost.py", capsys)
    for key in ("device", "device_name", "torch", "arch", "classes", "images", "batch", "ratios", "rows"):
        assert key in res, key
    assert res["arch"] == "demo_resnet" and res["classes"] == 7
    rows = {row["measure"]: row for row in res["rows"]}
    assert set(rows) == {"fwd_bwd", "k_grads", "fisher_exact", "fisher_mc1", "train_b1", "train_batch"}
    for name, row in rows.items():
        assert _positive(row["images_per_s"]) and _positive(row["median_s"]), name
    for key in ("exact_over_k_grads", "mc1_over_train_b1", "mc1_over_train_batch"):
        assert _positive(res["ratios"][key]), key


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(script).stem}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_check_runs_its_training_checks_on_the_cpu(capsys):
    """cuda_check.py needs a GPU for its verdict; its training checks take any device, so the
    library calls they make (train_steps on a method, every registered method) are exercised
    here on the CPU: the loss falls, and the CPU run is its own reference exactly."""
    import torch

    from spbench.methods import METHODS

    bench = _load("cuda_check.py")
    cpu = torch.device("cpu")
    training = bench.check_training(cpu)
    assert training["last"] < training["first"] and 0.0 <= training["accuracy"] <= 1.0
    methods = bench.check_methods(cpu)
    assert set(methods) == set(METHODS) >= set(PENALTIES) | {"lwf", "delta", "bss", "co_tuning"}
    assert all(err == 0.0 for err in methods.values()), methods
    if not torch.cuda.is_available():
        assert bench.main([]) == 2


def test_delta_setup_quick(capsys):
    """delta_setup.py on the demo network: both variants score every channel of the three
    tapped convolutions (16 + 32 + 64), the network traces, and the weights agree to the bit
    (the script's exit status says so too)."""
    res = _run("delta_setup.py", capsys)
    assert res["arch"] == "demo_resnet" and res["traced"] is True
    assert res["channels"] == 16 + 32 + 64 and len(res["layers"]) == 3
    assert res["same_weights"] is True
    assert _positive(res["cut_s"]) and _positive(res["whole_s"]) and _positive(res["whole_over_cut"])
