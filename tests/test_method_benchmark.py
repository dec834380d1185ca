"""Smoke test of benchmarks/method_overhead.py (``--quick --json``, in this process): a row per
method with positive step times, and the forwards each step ran — the methods that read the
frozen source network run it once per step without autograd, the parameter penalties never.
No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from spbench.methods import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "method_overhead.py"


def test_method_overhead_quick(capsys):
    spec = importlib.util.spec_from_file_location("_bench_method_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main(["--quick", "--json", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in res["rows"]}
    assert set(rows) == set(METHODS)
    for name, row in rows.items():
        assert math.isfinite(row["step_seconds"]) and row["step_seconds"] > 0
        if name == "none":
            continue
        ours, peer = row["spbench_forwards"], row["peer_forwards"]
        assert ours["backbone"] == 1 and peer["backbone"] == 1
        if METHODS[name].needs.teacher:
            assert ours == {"backbone": 1, "frozen_network": 1, "frozen_with_autograd": 0}
            assert peer["frozen_network"] == 1 and peer["frozen_with_autograd"] == 1
        else:
            assert ours["frozen_network"] == 0 and peer["frozen_network"] == 0
