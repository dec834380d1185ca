"""A method from outside the repository: the README's plugin package is built and installed
with pip (its entry point in the `spbench.methods` group), found by spbench's registry, and run
by the real `snakemake` CLI from one config line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _block(name: str, lang: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\s*```{lang}\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no {lang} example marked {name!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The README's plugin, installed by pip into a folder of its own (dist-info included)."""
    pkg = tmp_path_factory.mktemp("my-methods")
    (pkg / "my_methods.py").write_text(_block("plugin", "python"))
    pyproject = _block("plugin-pyproject", "toml")
    pyproject += '\n[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    pyproject += '\n[tool.setuptools]\npy-modules = ["my_methods"]\n'
    (pkg / "pyproject.toml").write_text(pyproject)
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    assert list(site.glob("my_methods-*.dist-info/entry_points.txt")) or list(site.glob("*.dist-info/entry_points.txt"))
    return site


def test_registry_finds_the_installed_plugin(plugin_site):
    code = (
        "import torch; from spbench.methods import METHODS, method_class, make_method, MethodContext;"
        "from spbench.models import build_model, split_parameters;"
        "assert 'feature_decay' not in METHODS; cls = method_class('feature_decay');"
        "m = build_model('demo_resnet', 3, 1); i, h = split_parameters(m);"
        "meth = make_method('feature_decay', MethodContext(m, i, h), gamma=0.5);"
        "print(cls.__module__, meth.settings['gamma'])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(REPO / "src")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["my_methods", "0.5"]


@pytest.mark.e2e
def test_workflow_runs_the_plugin_from_one_config_line(plugin_site, tmp_path):
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["grid"]["methods"] = {"none": {}, "feature_decay": {"gamma": [0.001, 0.01]}}
    config["grid"]["replicates"] = 1
    config["finetune"]["steps"] = 4
    config["sources"]["digits-src"]["pretrain"]["epochs"] = 1
    del config["figures"]
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile", "plugin.yaml",
           "--cores", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    chosen = json.loads((tmp_path / "results/selection/digits-src/digits-mod3-k5/feature_decay.json").read_text())
    assert chosen["method"] == "feature_decay" and chosen["selected"]["gamma"] in (0.001, 0.01)
    records = list((tmp_path / "results/runs/main/digits-src/digits-mod3-k5/feature_decay").rglob("record.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert json.loads(record["hparams_json"]) == {"gamma": chosen["selected"]["gamma"]}
    assert "feature_decay" in (tmp_path / "reports" / "table2.md").read_text()
