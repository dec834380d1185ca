"""Smoke test of benchmarks/train_throughput.py: ``--quick --json`` on the demo network prints
one JSON object with the expected keys and positive, finite numbers, a row per freeze depth and
precision. No timing is asserted (the machine may be busy)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _script():
    """benchmarks/train_throughput.py as a module (its main() runs in the test process)."""
    spec = importlib.util.spec_from_file_location("_bench_train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_quick(capsys):
    module = _script()
    capsys.readouterr()
    assert module.main(["--quick", "--json", "--threads", "1", "--freeze", "2,0"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("device", "device_name", "torch", "arch", "image_size", "stored_size", "channels", "batch",
                "steps", "repeats", "threads", "method", "alpha", "beta", "rows"):
        assert key in res, key
    assert res["arch"] == "demo_resnet" and res["image_size"] == 16 and res["channels"] == 1
    assert res["stored_size"] > res["image_size"]  # the random crop has room to move
    assert res["method"] == "l2_sp" and res["threads"] == 1
    assert res["freeze"] == [0, 2]
    rows = {(row["freeze"], row["precision"]): row for row in res["rows"]}
    assert list(rows) == [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16")]
    # depth 2 trains without the parameters of the first two units (spbench.models.apply_freeze)
    from spbench.models import apply_freeze, build_model

    net = build_model("demo_resnet", res["classes"], 1)
    frozen = {n for n in apply_freeze(net, 2)}
    assert frozen and rows[(0, "fp32")]["trainable_parameters"] == sum(p.numel() for p in net.parameters())
    assert rows[(2, "bf16")]["trainable_parameters"] == sum(p.numel() for n, p in net.named_parameters() if n not in frozen)
    for name, row in rows.items():
        for key in ("spbench_images_per_s", "bare_images_per_s", "ratio", "spbench_step_ms", "bare_step_ms"):
            assert _positive(row[key]), (name, key)
        lo, hi = row["ratio_range"]
        assert _positive(lo) and _positive(hi) and lo <= hi, name
        assert math.isclose(row["ratio"], row["spbench_images_per_s"] / row["bare_images_per_s"])
        for variant in ("spbench", "bare"):
            assert len(row["per_repeat"][variant]) == res["repeats"]
            assert all(_positive(v) for v in row["per_repeat"][variant])


def test_train_throughput_compiled(capsys):
    """--compile: the backbone compiled for both variants, the compilation in the (at least 2)
    warm-up steps; the output says so."""
    module = _script()
    capsys.readouterr()
    assert module.main(["--quick", "--json", "--threads", "1", "--precisions", "fp32", "--compile", "--warmup", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["compile"] is True and res["warmup"] == 2
    (row,) = res["rows"]
    assert _positive(row["spbench_images_per_s"]) and _positive(row["bare_images_per_s"])
