"""Preemption: SIGTERM mid-way leaves a checkpoint and a failed run; the rerun resumes and ends
with the same record as a run that was never interrupted (cost fields aside)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spbench import forkserver
from spbench.config import RunSpec, validate_config
from spbench.methods import MethodContext, make_method
from spbench.models import build_model, split_parameters
from spbench.pipeline import (
    build_source,
    compute_fisher,
    finetune_run,
    load_checkpoint,
    prepare_task_from_config,
    save_checkpoint,
)
from spbench.results import read_record
from spbench.train import Preempted, StopOnSignal, train_steps

REPO = Path(__file__).resolve().parents[1]
COST_FIELDS = {"wall_seconds", "images_per_second", "started_at", "ended_at"}
STEPS = 400
SPEC = RunSpec("digits-src", "digits-mod3-k5", "l2_sp_fisher", {"alpha": 0.1, "beta": 0.01, "lr": 0.05}, 0, 0)


def _train(model, method, x, y, **kw):
    return train_steps(
        model, method, x, y, steps=12, batch_size=4, lr=0.05, generator=torch.Generator().manual_seed(3), **kw
    )


def _setup():
    torch.manual_seed(0)
    model = build_model("demo_resnet", 3, 1).double()
    inherited, head = split_parameters(model)
    method = make_method("l2_sp", MethodContext(model, inherited, head), alpha=0.1, beta=0.01)
    return model, method


def test_stop_and_resume_follow_the_uninterrupted_trajectory():
    """Stopping after step 5 and resuming from the saved state gives, bit for bit, the weights,
    batch-norm statistics and loss curve of 12 uninterrupted steps (float64, momentum 0.9)."""
    x = torch.randn(10, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10) % 3
    model, method = _setup()
    full = _train(model, method, x, y)
    expected = model.state_dict()
    w0 = {k: v.clone() for k, v in method.state_dict().items()}

    model, method = _setup()
    saved, done = [], []
    with pytest.raises(Preempted):
        _train(model, method, x, y, save_checkpoint=saved.append, stop=lambda: len(done) == 5,
               on_step=lambda step, loss: done.append(step))
    assert [s["step"] for s in saved] == [5]
    assert saved[0]["method"].keys() == w0.keys()  # the method's state (w0) is in the checkpoint
    # A fresh process: model and method rebuilt, then the checkpoint. Built here on other
    # weights, so that the run's weights and its w0 can only come from the checkpoint.
    model, _ = _setup()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    inherited, head = split_parameters(model)
    method = make_method("l2_sp", MethodContext(model, inherited, head), alpha=0.1, beta=0.01)
    assert not all(torch.equal(method.state_dict()[k], w0[k]) for k in w0)
    resumed = _train(model, method, x, y, resume=saved[0])
    assert resumed.loss == full.loss
    assert resumed.lr == full.lr
    assert resumed.images == full.images
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    for name, tensor in method.state_dict().items():
        assert torch.equal(tensor, w0[name]), name


def test_periodic_checkpoints():
    """checkpoint_every=4 saves after steps 4 and 8 (not after the last step) and goes on."""
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10) % 3
    model, method = _setup()
    model.float()
    saved = []
    history = _train(model, method.float(), x, y, save_checkpoint=saved.append, checkpoint_every=4)
    assert [s["step"] for s in saved] == [4, 8]
    assert len(history.loss) == 12
    assert saved[1]["history"]["loss"] == history.loss[:8]


def test_stop_on_signal_sets_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()
    assert signal.getsignal(signal.SIGTERM) == before


# --- a real process, killed mid-way ---------------------------------------------------------

CHILD = """
import json, sys
from spbench.config import RunSpec
from spbench.pipeline import finetune_run, setup_logging
args = json.loads(sys.argv[1])
setup_logging()
finetune_run(args["config"], RunSpec.from_wildcards(args["spec"]), **args["paths"])
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny config's source network and Fisher, made once with the library."""
    root = tmp_path_factory.mktemp("preempt")
    raw = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    raw["finetune"].update(steps=STEPS, batch_size=8)
    config = validate_config(raw)
    for task in ("digits-src", "digits-mod3-k5"):
        prepare_task_from_config(config, task, root / "data" / task)
    src = root / "sources" / "digits-src"
    src.mkdir(parents=True)
    build_source(config, "digits-src", root / "data" / "digits-src", src / "model.pt", src / "info.json")
    compute_fisher(config, "digits-src", src / "model.pt", root / "data" / "digits-src", src / "fisher.pt")
    return root, config


def _paths(root: Path, name: str) -> dict:
    src = root / "sources" / "digits-src"
    return {
        "source_model": str(src / "model.pt"),
        "source_info": str(src / "info.json"),
        "target_dir": str(root / "data" / "digits-mod3-k5"),
        "source_dir": str(root / "data" / "digits-src"),
        "fisher_path": str(src / "fisher.pt"),
        "record_out": str(root / name / "record.json"),
        "checkpoint_path": str(root / name / "checkpoint.pt"),
    }


def _child(config: dict, paths: dict, server: str | None = None) -> subprocess.Popen:
    """The fine-tune in a process of its own, or, given a fork server's socket, in a fork of
    that server (as a local workflow run starts its jobs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    arg = json.dumps({"config": config, "spec": SPEC.wildcards, "paths": paths})
    if server is None:
        return subprocess.Popen([sys.executable, "-c", CHILD, arg], stderr=subprocess.PIPE, text=True, env=env)
    script = Path(paths["record_out"]).parent.parent / "job.py"
    script.write_text("from spbench.forkserver import delegate\ndelegate()\n" + CHILD)
    env[forkserver.ENV] = server
    return subprocess.Popen([sys.executable, str(script), arg], stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, path = forkserver.start(tmp_path_factory.mktemp("forkserver"), preload=("spbench.pipeline",))
    yield path
    forkserver.stop(proc, path)


@pytest.mark.e2e
@pytest.mark.parametrize("via", ["own process", "fork server"])
def test_sigterm_mid_run_then_resume_gives_the_uninterrupted_record(prepared, via, request):
    root, config = prepared
    server = request.getfixturevalue("server") if via == "fork server" else None
    paths = _paths(root, f"interrupted-{via.replace(' ', '-')}")
    child = _child(config, paths, server)
    lines = []
    for line in child.stderr:  # wait until training is under way, then preempt it
        lines.append(line)
        if f"step 51/{STEPS}" in line:
            child.send_signal(signal.SIGTERM)
            break
    lines += child.stderr.readlines()
    assert child.wait(timeout=120) != 0, "".join(lines)
    log = "".join(lines)
    assert "Preempted" in log and "checkpoint saved" in log, log
    assert not Path(paths["record_out"]).exists()
    state = load_checkpoint(paths["checkpoint_path"])
    assert 51 <= state["step"] < STEPS
    assert json.loads(state["config_json"])["run"]["key"] == SPEC.key
    assert set(state) >= {"model", "method", "optimizer", "generator", "torch_rng", "history"}
    assert "penalty" not in state  # the old key: the method's state replaced it
    w0_keys = [k for k in state["method"] if k.startswith("penalty.w0.")]
    fisher_keys = [k for k in state["method"] if k.startswith("penalty.fisher.")]
    assert w0_keys and len(w0_keys) == len(fisher_keys) and len(state["method"]) == 2 * len(w0_keys)

    rerun = _child(config, paths, server)
    log = rerun.stderr.read()
    assert rerun.wait(timeout=300) == 0, log
    assert f"resuming from step {state['step']}" in log
    assert not Path(paths["checkpoint_path"]).exists(), "the checkpoint outlived the finished run"

    clean = _paths(root, f"uninterrupted-{via.replace(' ', '-')}")
    record, _ = finetune_run(config, SPEC, **clean)
    resumed = read_record(paths["record_out"])
    assert {k: v for k, v in resumed.items() if k not in COST_FIELDS} == {
        k: v for k, v in record.items() if k not in COST_FIELDS
    }
    assert len(resumed["train_loss"]) == STEPS


def test_checkpoint_of_another_run_is_refused(prepared, tmp_path):
    root, config = prepared
    paths = _paths(root, "other")
    Path(paths["checkpoint_path"]).parent.mkdir(parents=True)
    save_checkpoint(paths["checkpoint_path"], {"run_key": "someone/else", "config_json": "{}", "step": 1})
    with pytest.raises(ValueError, match="another run"):
        finetune_run(config, SPEC, **paths)


# --- a run group: several runs in one process ---------------------------------------------

def _group(root: Path, name: str, config: dict, reps: int = 2):
    from spbench.config import group_members

    specs = group_members(config, "main", SPEC.source, SPEC.target, SPEC.method, dict(SPEC.setting), 0)[:reps]
    paths = {k: v for k, v in _paths(root, name).items() if k not in ("record_out", "checkpoint_path")}
    out = root / name
    return specs, dict(
        record_outs=[str(out / s.key / "record.json") for s in specs],
        model_outs=[str(out / s.key / "model.pt") for s in specs],
        checkpoint_paths=[str(out / "checkpoints" / s.key / "checkpoint.pt") for s in specs],
        **paths,
    )


@pytest.fixture
def short(prepared):
    root, config = prepared
    config = json.loads(json.dumps(config))
    config["finetune"]["steps"] = 30
    config["grid"]["replicates"] = 2
    return root, config


def test_a_group_gives_each_run_the_record_it_gets_alone(short):
    """Two replicates trained one after the other in one process: each record is the one the
    run gets when trained on its own (no state leaks from one run into the next)."""
    from spbench.pipeline import finetune_group

    root, config = short
    specs, kw = _group(root, "group", config)
    records = finetune_group(config, specs, **kw)
    assert [r["replicate"] for r in records] == [0, 1] and records[0]["seed"] != records[1]["seed"]
    paths = _paths(root, "alone")
    paths["checkpoint_path"] = None
    alone, _ = finetune_run(config, specs[1], **paths)
    strip = lambda r: {k: v for k, v in r.items() if k not in COST_FIELDS}  # noqa: E731
    assert strip(read_record(kw["record_outs"][1])) == strip(alone)
    assert not any((Path(p).parent / "done").exists() for p in kw["checkpoint_paths"])


def test_a_failed_group_keeps_its_finished_runs(short, monkeypatch):
    """The second run is preempted: the job's outputs are removed (as Snakemake removes a failed
    job's), and the retry restores the first run instead of training it again."""
    import spbench.pipeline as pipeline

    root, config = short
    specs, kw = _group(root, "failing", config)
    real = pipeline.finetune_run
    calls = []

    def preempt_second(config, spec, **kwargs):
        calls.append(spec.key)
        if len(calls) == 2:
            raise Preempted("training stopped at step 3 of 30; rerun to resume")
        return real(config, spec, **kwargs)

    monkeypatch.setattr(pipeline, "finetune_run", preempt_second)
    with pytest.raises(Preempted):
        pipeline.finetune_group(config, specs, **kw)
    first = read_record(kw["record_outs"][0])
    for path in kw["record_outs"] + kw["model_outs"]:
        Path(path).unlink(missing_ok=True)
    calls.clear()
    monkeypatch.setattr(pipeline, "finetune_run", lambda config, spec, **kwargs: (calls.append(spec.key), real(config, spec, **kwargs))[1])
    pipeline.finetune_group(config, specs, **kw)
    assert calls == [specs[1].key]  # the first run was restored, not trained again
    assert read_record(kw["record_outs"][0]) == first and Path(kw["model_outs"][0]).exists()
    assert not any((Path(p).parent / "done").exists() for p in kw["checkpoint_paths"])


def test_a_finished_run_of_another_config_is_trained_again(short):
    from spbench.pipeline import _restore_finished, finetune_group

    root, config = short
    specs, kw = _group(root, "changed", config, reps=1)
    finetune_group(config, specs, **kw)
    done = Path(kw["checkpoint_paths"][0]).parent / "done"
    done.mkdir(parents=True)
    for name, out in (("record.json", kw["record_outs"][0]), ("model.pt", kw["model_outs"][0])):
        (done / name).write_bytes(Path(out).read_bytes())
    assert _restore_finished(config, specs[0], done, kw["record_outs"][0], kw["model_outs"][0]) is not None
    config["finetune"]["steps"] = 31
    assert _restore_finished(config, specs[0], done, kw["record_outs"][0], kw["model_outs"][0]) is None
    assert not done.exists()


def test_losses_read_in_batches_are_the_per_step_losses():
    """Without ``on_step`` the loop reads the losses from the device a batch at a time (every
    ``log_every`` steps, at a checkpoint, at the end); the history is the one read step by
    step, value for value, and a resume from a checkpoint taken between two reads continues it."""
    x = torch.randn(10, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10) % 3
    model, method = _setup()
    seen = []
    per_step = _train(model, method, x, y, on_step=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == list(range(12)) and [v for _, v in seen] == per_step.loss
    model, method = _setup()
    saved = []  # deep copies: the state holds the live weights, which train on after it
    batched = _train(model, method, x, y, log_every=5, save_checkpoint=lambda s: saved.append(copy.deepcopy(s)),
                     checkpoint_every=7)
    assert batched.loss == per_step.loss and batched.lr == per_step.lr and len(batched.loss) == 12
    assert [s["step"] for s in saved] == [7] and saved[0]["history"]["loss"] == per_step.loss[:7]
    model, method = _setup()
    resumed = _train(model, method, x, y, log_every=5, resume=saved[0])
    assert resumed.loss == per_step.loss


def test_a_non_finite_loss_names_its_step_and_no_later_checkpoint_is_saved():
    """A diverging run (lr 1e6) raises FloatingPointError naming the first step whose loss is
    not finite, whether the losses are read every step or in batches; read in batches, every
    checkpoint is still taken before that step."""
    x = torch.randn(10, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10) % 3

    def diverge(**kw):
        model, method = _setup()
        return train_steps(model, method, x, y, steps=40, batch_size=4, lr=1e6,
                           generator=torch.Generator().manual_seed(3), **kw)

    seen = []
    with pytest.raises(FloatingPointError, match=r"at step (\d+) ") as per_step:
        diverge(on_step=lambda step, loss: seen.append(loss))
    first_bad = int(re.search(r"at step (\d+) ", str(per_step.value)).group(1))
    assert first_bad == len(seen) and 0 < first_bad < 39  # all earlier losses were finite
    saved = []
    with pytest.raises(FloatingPointError, match=rf"at step {first_bad} "):
        diverge(log_every=50, save_checkpoint=saved.append, checkpoint_every=2)
    assert saved and all(s["step"] <= first_bad for s in saved)
    assert all(math.isfinite(v) for s in saved for v in s["history"]["loss"])
