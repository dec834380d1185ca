"""The workflow's light jobs (selection checkpoints, tracking, tables, report, downloads) do not
import torch: on a small grid each job's start is a large share of its time, and torch's
import (about 1.3 s here) would be most of it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow_scripts"

#: The scripts whose jobs train, evaluate or decode images: these need torch.
HEAVY = {"activations", "build_source", "estimate_fisher", "finetune", "overhead", "prepare_task"}


def _imports(script: Path) -> list[str]:
    return re.findall(r"^(?:from|import) ([\w.]+)", script.read_text(), flags=re.M)


def test_every_script_is_classed():
    names = {p.stem for p in SCRIPTS.glob("*.py")}
    assert HEAVY <= names and len(names - HEAVY) >= 10


@pytest.mark.parametrize("script", sorted(p.stem for p in SCRIPTS.glob("*.py") if p.stem not in HEAVY))
def test_light_script_imports_no_torch(script):
    modules = _imports(SCRIPTS / f"{script}.py")
    assert any(m.startswith("spbench") for m in modules), modules
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"{script}.py imports torch through {modules}"


def test_a_heavy_script_does_import_torch():
    """The check can fail: the fine-tune script's imports do pull torch in."""
    modules = _imports(SCRIPTS / "finetune.py")
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
