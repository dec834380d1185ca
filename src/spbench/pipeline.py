"""The stages of the workflow as plain functions of the validated config.

Each workflow script unpacks its rule's inputs and calls one function here, or, for the light
jobs that import no torch, in :mod:`spbench.selection`, :mod:`spbench.results`,
:mod:`spbench.tracking` or :mod:`spbench.reports`; the same functions run from a notebook.
Nothing here imports Snakemake.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import code_version
from .augment import load_task_views
from .config import TRAINING_KEYS, RunSpec, derive_seed, format_setting, post_hoc_variants
from .data import fold_split, load_task, prepare_task
from .datasets import RAW_INPUTS, convert_weights
from .download import input_path
from .integrity import DamagedArtifactError, load_sealed, save_sealed
from .fisher import estimate_fisher, load_fisher, normalize_fisher, save_fisher
from .models import apply_freeze, build_model, compile_backbone, split_parameters
from .methods import MethodContext, make_method, method_class
from .progress import setup_logging
from .results import aggregate_records, write_json_atomic, write_record
from .selection import halve, select_setting
from .train import (
    StopOnSignal,
    evaluate,
    load_source,
    pretrain,
    resolve_precision,
    save_source,
    set_determinism,
    train_steps,
)

__all__ = [
    "prepare_task_from_config",
    "task_inputs",
    "build_source",
    "compute_fisher",
    "run_config",
    "finetune_run",
    "finetune_group",
    "evaluation_split",
    "cpu_model",
    "device_name",
    "resolve_device",
    "save_checkpoint",
    "load_checkpoint",
    "setup_logging",
    "aggregate_records",
    "select_setting",
    "halve",
    "activation_table",
    "overhead_table",
]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.device is 'cuda' but no GPU is visible to this job")
    return torch.device(name)


def channels_last(option: str | bool, device: torch.device) -> bool:
    """``finetune.channels_last``: ``auto`` (on a GPU, where convolutions run faster in that
    memory format), true or false."""
    return device.type == "cuda" if option == "auto" else bool(option)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The device as records and benchmarks name it (``make plan`` prices a grid per name):
    the GPU's name, or on the CPU its model and the torch threads in use, e.g.
    ``cpu: AMD EPYC, 1 thread (2 logical CPUs)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu: {cpu_model()}, {threads} thread{'s' if threads != 1 else ''} ({os.cpu_count()} logical CPUs)"


def save_checkpoint(path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint, sealed with its content digest, so that ``path`` holds either the
    whole old or the whole new one."""
    save_sealed(path, dict(state))


def load_checkpoint(path) -> dict[str, Any]:
    """A checkpoint of :func:`save_checkpoint`, on the CPU (loading copies it to the model's
    device), after checking its digest."""
    return load_sealed(path, rebuild="remove it to start the run afresh")


def prepare_task_from_config(config: Mapping, task: str, out_dir) -> Path:
    spec = dict(config["tasks"][task])
    builder = spec.pop("builder")
    for key in RAW_INPUTS.get(builder, ()):  # a download's name -> its extracted folder or file
        spec[key] = input_path(config["data_dir"], spec[key], config["downloads"][spec[key]])
    return prepare_task(builder, spec, out_dir)


def task_inputs(config: Mapping, task_dir, *, generator: torch.Generator | None = None, device="cpu"):
    """(meta, x, y) of a prepared task as the training loop reads it. ``finetune.augment:
    none``: the whole cache as float tensors (the demo); ``paper``: lazy views of the uint8
    cache, training images augmented with ``generator`` (random blur, mirror, crop), test
    images centrally cropped (:mod:`spbench.augment`)."""
    ft = config["finetune"]
    if ft.get("augment", "none") == "none":
        data = load_task(task_dir)
        return data.meta, data.x, data.y
    return load_task_views(task_dir, crop=ft.get("crop", 224), generator=generator, device=device,
                           normalize=ft.get("normalize", "mean"))


def build_source(config: Mapping, source: str, task_dir, model_out, info_out, weights_path=None) -> dict:
    """Make the source network: pretrain it on its task (``weights: pretrain``), read a
    state dict (``weights: file``) or convert a published checkpoint (``weights: download``,
    ``weights_path`` is the verified download); evaluate it on the source test split; write
    the checkpoint and ``info_out`` (JSON with its accuracy and provenance)."""
    spec = config["sources"][source]
    if spec["weights"] == "download":
        meta, x, y = task_inputs(config, task_dir)
        num_classes, channels = meta["num_classes"], meta["channels"]
        model = build_model(spec["arch"], num_classes, channels)
        model.load_state_dict(convert_weights(weights_path, spec["convert"]))
        download = config["downloads"][spec["download"]]
        provenance = {"weights": "download", "download": spec["download"], "url": download.get("url", ""),
                      "checksum": download["checksum"], "convert": spec["convert"]}
        accuracy = evaluate(model, x["test"], y["test"], config["finetune"]["eval_batch_size"])
        return _write_source(source, spec, model, accuracy, num_classes, channels, provenance, model_out, info_out)
    data = load_task(task_dir)
    if spec["weights"] == "pretrain":
        opts = {"epochs": 30, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, "seed": 0, **spec.get("pretrain", {})}
        set_determinism(opts["seed"], threads=config["finetune"]["threads"])
        model, history = pretrain(spec["arch"], data.x["train"], data.y["train"], data.num_classes, **opts)
        provenance = {"weights": "pretrain", **opts, "final_train_loss": history.loss[-1], "seconds": history.seconds}
    else:
        model = build_model(spec["arch"], data.num_classes, data.channels)
        state = torch.load(spec["path"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        provenance = {"weights": "file", "path": str(spec["path"])}
    accuracy = evaluate(model, data.x["test"], data.y["test"])
    return _write_source(source, spec, model, accuracy, data.num_classes, data.channels, provenance, model_out, info_out)


def _write_source(source, spec, model, accuracy, num_classes, channels, provenance, model_out, info_out) -> dict:
    info = {
        "source": source,
        "arch": spec["arch"],
        "task": spec["task"],
        "test_accuracy": accuracy,
        "num_classes": num_classes,
        "in_channels": channels,
        **provenance,
    }
    log.info("source %s: test accuracy %.4f", source, accuracy)
    save_source(model_out, model, arch=spec["arch"], in_channels=channels, meta=info)
    write_json_atomic(info_out, info)
    return info


def compute_fisher(config: Mapping, source: str, model_path, task_dir, out_path) -> dict:
    """Fisher diagonal of the source network on its own source data, over all backbone
    tensors (the penalties restrict it to their scope)."""
    opts = config["fisher"]
    set_determinism(opts["seed"], threads=config["finetune"]["threads"])
    dev = resolve_device(config["finetune"]["device"])
    model, source_blob = load_source(model_path)
    model.to(dev)
    _, xs, _ = task_inputs(config, task_dir)  # central crops, no augmentation
    x = xs[opts["split"]]
    # m images drawn at random (seeded by fisher.seed) from the split, in the split's order
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts["seed"]))[: opts["num_examples"]]
    pick = pick.sort().values
    x = x[pick] if isinstance(x, torch.Tensor) else x.select(pick.numpy())
    x = x.to(dev)
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    gen = torch.Generator().manual_seed(opts["seed"])
    start = time.perf_counter()
    fisher = estimate_fisher(
        model, x, names, estimator=opts["estimator"], samples=opts["samples"], batch_size=opts["batch_size"], generator=gen
    )
    meta = {
        "source": source,
        "estimator": opts["estimator"],
        "samples": opts["samples"] if opts["estimator"] == "mc" else 0,
        "m": len(x),
        "split": opts["split"],
        "seconds": time.perf_counter() - start,
        "source_model_sha256": source_blob["content_sha256"],
    }
    save_fisher(out_path, fisher, meta)
    flat = torch.cat([f.flatten() for f in fisher.values()])
    log.info("Fisher of %s: m=%d, mean %.3g, max/mean %.1f", source, len(x), flat.mean(), flat.max() / flat.mean())
    return meta


def run_config(config: Mapping, spec: RunSpec) -> dict[str, Any]:
    """The resolved configuration of one run: what goes to MLflow, the record and logs. A
    validation run that scores post-hoc values (:func:`spbench.config.post_hoc_variants`) names
    them: listing another value of WiSE-FT's a changes the run, which is then trained again."""
    source = config["sources"][spec.source]
    post_hoc = [format_setting(s) for s in post_hoc_variants(config, spec)]
    return {
        "run": {
            "key": spec.key,
            "experiment": spec.experiment,
            "evaluation": spec.evaluation,
            "source": spec.source,
            "target": spec.target,
            "method": spec.method,
            "setting": dict(spec.setting),
            "freeze": spec.freeze,
            "replicate": spec.replicate,
            "seed": spec.seed,
            **({"post_hoc_settings": post_hoc} if post_hoc else {}),
        },
        # lr is in "run"; how often a run is checkpointed does not change its result
        "finetune": {k: v for k, v in config["finetune"].items() if k not in ("lr", "checkpoint_every")},
        "selection": dict(config["selection"]) if spec.fold is not None else {},
        "fisher": dict(config["fisher"]) if method_class(spec.method).needs.fisher else {},
        "source": {k: v for k, v in source.items()},
        "target_task": dict(config["tasks"][spec.target]),
        "source_task": dict(config["tasks"][source["task"]]),
    }


def evaluation_split(config: Mapping, spec: RunSpec, xs: Mapping[str, Any], ys: Mapping[str, torch.Tensor]):
    """(x_train, y_train, x_eval, y_eval) of a run: the training split and the test split for a
    ``test`` run; for ``val{f}``, the training split less fold f (stratified, seeded by the
    target) and fold f. The evaluated images are seen as the test set is: a cached view's
    central crops, never its augmentation (a view is narrowed with ``select``: indexing it
    would return augmented images and draw from its generator)."""
    x, y = xs["train"], ys["train"]
    if spec.fold is None:
        return x, y, xs["test"], ys["test"]
    sel = config["selection"]
    train_idx, val_idx = fold_split(y.cpu().numpy(), sel["folds"], spec.fold, derive_seed("folds", spec.target))
    if isinstance(x, torch.Tensor):
        return x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    return x.select(train_idx), y[train_idx], x.central().select(val_idx), y[val_idx]


def finetune_run(
    config: Mapping,
    spec: RunSpec,
    *,
    source_model,
    source_info,
    target_dir,
    source_dir,
    fisher_path=None,
    record_out,
    model_out=None,
    device: str | None = None,
    checkpoint_path=None,
) -> tuple[dict, list[float]]:
    """One fine-tune: source backbone + new head on the target, method ``spec.method`` at
    ``spec.setting``.

    A ``test`` run trains on the target's training split and scores on its test split; a
    ``val{f}`` run trains on the training split less fold f and scores on fold f. Writes and
    returns the result record (see :mod:`spbench.results`) and the train-loss curve; the
    fine-tuned classifier goes to ``model_out`` when given.

    With ``checkpoint_path``: on SIGTERM (and every ``finetune.checkpoint_every`` steps) the
    run's state — weights, optimizer, the method's state, step, RNG states and the resolved
    config — is written there; after SIGTERM :class:`spbench.train.Preempted` is raised. A
    later call finds the checkpoint and resumes: its record equals an uninterrupted run's,
    but for the cost fields. The checkpoint is removed once the record is written.
    """
    ft = config["finetune"]
    resolved = run_config(config, spec)
    set_determinism(spec.seed, threads=ft["threads"])
    dev = resolve_device(device or ft["device"])
    precision = resolve_precision(ft["precision"], dev)
    augment_gen = torch.Generator().manual_seed(derive_seed("augment", spec.seed))
    target_meta, target_x, target_y = task_inputs(config, target_dir, generator=augment_gen, device=dev)
    _, source_x, source_y = task_inputs(config, source_dir, device=dev)
    info = json.loads(Path(source_info).read_text())

    src_model, source_blob = load_source(source_model)
    model = build_model(info["arch"], target_meta["num_classes"], info["in_channels"])  # head: seeded random init
    model.backbone.load_state_dict(src_model.backbone.state_dict())
    model.to(dev)
    src_model.to(dev).eval().requires_grad_(False)
    if channels_last(ft["channels_last"], dev):
        model.to(memory_format=torch.channels_last)
        src_model.to(memory_format=torch.channels_last)

    frozen = apply_freeze(model, spec.freeze)
    inherited, head = split_parameters(model, ft["sp_scope"])
    fisher = None
    fisher_meta: dict[str, Any] = {}
    cls = method_class(spec.method)
    if cls.needs.fisher:
        if fisher_path is None:
            raise ValueError(f"method {spec.method!r} needs the source's Fisher file")
        raw, fisher_meta = load_fisher(fisher_path)
        if fisher_meta.get("source_model_sha256") != source_blob["content_sha256"]:
            raise DamagedArtifactError(
                f"{fisher_path} was estimated on another {source_model} (its recorded source digest differs); "
                "remove it and rerun snakemake to estimate it again")
        # rescaled over the whole backbone, then restricted to S: α means the same whatever
        # sp_scope and the freeze depth leave in S
        whole = normalize_fisher(raw, config["fisher"]["normalize"])
        fisher = {n: whole[n].to(dev) for n in inherited}
    context = MethodContext(model, inherited, head, source_model=src_model, fisher=fisher,
                            nonsmooth=ft["nonsmooth"], epsilon=ft["epsilon"])
    method = make_method(spec.method, context, **spec.hparams).to(dev)
    if ft["compile"]:  # after the method's copies of the model (a teacher is the source's, uncompiled)
        compile_backbone(model)
    log.info("run %s (seed %d): %s; %d frozen tensors%s", spec.key, spec.seed, method.describe(), len(frozen),
             "; backbone compiled" if ft["compile"] else "")

    x, y, x_eval, y_eval = evaluation_split(config, spec, target_x, target_y)
    x, y = x.to(dev), y.to(dev)
    gen = torch.Generator().manual_seed(derive_seed("batches", spec.seed))
    config_json = json.dumps(resolved, sort_keys=True)
    resume = None
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        resume = load_checkpoint(checkpoint_path)
        if resume["run_key"] != spec.key or resume["config_json"] != config_json:
            raise ValueError(f"{checkpoint_path} belongs to another run or config; remove it to start afresh")
        log.info("run %s: resuming from step %d of %s", spec.key, resume["step"], checkpoint_path)

    def checkpoint(state: dict[str, Any]) -> None:
        state.update(run_key=spec.key, config_json=config_json)
        save_checkpoint(checkpoint_path, state)
        log.info("run %s: checkpoint at step %d -> %s", spec.key, state["step"], checkpoint_path)

    # wall seconds count the training time of earlier attempts too
    start = time.perf_counter() - (resume["history"]["seconds"] if resume is not None else 0.0)
    started_at = time.time() - (resume["history"]["seconds"] if resume is not None else 0.0)
    # a successive-halving rung trains fewer steps, on the same schedule shrunk to fit
    steps = spec.steps(ft["steps"])
    milestones = [max(1, round(m * steps / ft["steps"])) for m in ft["lr_milestones"]]
    with StopOnSignal() as stop:
        history = train_steps(
            model,
            method,
            x,
            y,
            steps=steps,
            batch_size=ft["batch_size"],
            lr=spec.lr,
            momentum=ft["momentum"],
            schedule=ft["lr_schedule"],
            milestones=milestones,
            freeze=spec.freeze,
            bn_mode=ft["bn_mode"],
            generator=gen,
            resume=resume,
            save_checkpoint=checkpoint if checkpoint_path is not None else None,
            checkpoint_every=ft["checkpoint_every"],
            stop=stop,
            setup_x=x if isinstance(x, torch.Tensor) else x.central(),
            precision=precision,
            clip_grad_norm=ft["clip_grad_norm"],
            progress=f"fine-tune {spec.method} {spec.target} {spec.evaluation} rep{spec.replicate}",
        )
    # Source-task retention (Table 3): the fine-tuned backbone under the original source head,
    # or under the method's own retention head (LwF and Co-Tuning train a copy of it).
    retention = method.retention_head()
    source_net = torch.nn.Sequential(model.backbone, retention if retention is not None else src_model.head)
    x_eval, y_eval = x_eval.to(dev), y_eval.to(dev)

    def finalized_scores() -> tuple[float, float]:
        method.finalize_()  # e.g. WiSE-FT's interpolation, at the method's post-hoc values
        return (evaluate(model, x_eval, y_eval, ft["eval_batch_size"], precision),
                evaluate(source_net, source_x["test"].to(dev), source_y["test"].to(dev), ft["eval_batch_size"], precision))

    # A validation run of a method with post-hoc hyper-parameters scores each listed value from
    # its one training, the trained weights restored in between.
    variants = []
    post_hoc = post_hoc_variants(config, spec)
    if post_hoc:
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        own = dict(method.settings)
        for setting in post_hoc:
            method.settings.update({k: v for k, v in setting.items() if k in own})
            variant_test, variant_source = finalized_scores()
            model.load_state_dict(trained)
            variants.append({"setting": format_setting(setting), "hparams_json": json.dumps(
                {k: v for k, v in setting.items() if k not in TRAINING_KEYS}, sort_keys=True),
                "test_accuracy": variant_test, "source_accuracy": variant_source,
                "source_accuracy_drop": variant_source - info["test_accuracy"]})
        method.settings.update(own)
    test_acc, source_acc = finalized_scores()
    wall = time.perf_counter() - start
    describe = method.describe()
    hparams = spec.hparams
    record = {
        "run_key": spec.key,
        "experiment": spec.experiment,
        "source": spec.source,
        "target": spec.target,
        "method": spec.method,
        "setting": spec.setting_text,
        "freeze": spec.freeze,
        "evaluation": spec.evaluation,
        "replicate": spec.replicate,
        "seed": spec.seed,
        "hparams_json": json.dumps(hparams, sort_keys=True),
        "alpha": float(hparams.get("alpha", math.nan)),
        "beta": float(hparams.get("beta", math.nan)),
        "arch": info["arch"],
        "sp_scope": ft["sp_scope"],
        "penalty_variant": describe.get("variant", ""),
        "epsilon": describe.get("eps", 0.0),
        "bn_mode": ft["bn_mode"],
        "precision": precision.name,
        "fisher_estimator": fisher_meta.get("estimator", ""),
        "fisher_normalize": config["fisher"]["normalize"] if fisher is not None else "",
        "fisher_samples": int(fisher_meta.get("samples", 0)),
        "fisher_m": int(fisher_meta.get("m", 0)),
        "steps": steps,
        "batch_size": min(ft["batch_size"], len(x)),
        "lr": spec.lr,
        "n_train": len(x),
        "n_test": len(y_eval),
        "num_classes": target_meta["num_classes"],
        "n_inherited_tensors": describe["n_inherited_tensors"],
        "n_head_tensors": describe["n_head_tensors"],
        "n_method_parameters": describe["n_method_parameters"],
        "retention_head": "original" if retention is None else "method",
        "test_accuracy": test_acc,
        "final_train_loss": history.loss[-1],
        "source_accuracy": source_acc,
        "source_accuracy_pretrained": info["test_accuracy"],
        "source_accuracy_drop": source_acc - info["test_accuracy"],
        "device": device_name(dev),
        "wall_seconds": wall,
        "images_per_second": history.images / history.seconds,
        "spbench_version": code_version(),
        "torch_version": torch.__version__,
        "config_json": json.dumps(resolved, sort_keys=True),
        # beyond the table: the curve, for the tracker and for plots; when it trained (the
        # tracker's run times) and on what (its input dataset)
        "train_loss": history.loss,
        # the post-hoc values a validation run scored (each a row of the run table)
        "variants": variants,
        "started_at": started_at,
        "ended_at": started_at + wall,
        "target_dataset": {
            "name": spec.target,
            "digest": target_meta.get("content_sha256", ""),
            "source": str(target_dir),
            "builder": target_meta.get("builder", ""),
            "n_train": len(x),
            "n_eval": len(y_eval),
            "num_classes": target_meta["num_classes"],
            "evaluation": spec.evaluation,
        },
    }
    if model_out is not None:
        save_sealed(model_out, {"state_dict": model.state_dict(), "arch": info["arch"],
                                "num_classes": target_meta["num_classes"], "in_channels": info["in_channels"],
                                "run_key": spec.key})
    write_record(record_out, record)
    if checkpoint_path is not None:
        Path(checkpoint_path).unlink(missing_ok=True)
    log.info("run %s: test accuracy %.4f, source accuracy %.4f (drop %.4f), %.1f s",
             spec.key, test_acc, source_acc, source_acc - info["test_accuracy"], wall)
    return record, history.loss


def finetune_group(
    config: Mapping,
    specs: Sequence[RunSpec],
    *,
    record_outs: Sequence,
    model_outs: Sequence,
    checkpoint_paths: Sequence,
    log_paths: Sequence | None = None,
    on_record: Callable[[RunSpec, dict, list[float]], None] | None = None,
    **inputs,
) -> list[dict]:
    """A run group's fine-tunes (:func:`spbench.config.run_groups`), one after the other in
    this process, each by :func:`finetune_run` with its own record, model, checkpoint and log
    (``log_paths``); ``inputs`` are finetune_run's (source model and info, task folders,
    Fisher). ``on_record(spec, record, curve)`` follows each run (the tracker).

    Nothing finished is lost when a later run of the group fails or is preempted (the job's
    outputs are then removed): each finished run's record and model are also kept in a
    ``done/`` folder beside its checkpoint until the whole group is through, and a retry restores
    them instead of training again, when their resolved config is the run's."""
    import shutil

    records = []
    for i, spec in enumerate(specs):
        if log_paths:
            setup_logging(log_paths[i])
        done = Path(checkpoint_paths[i]).parent / "done"
        record = _restore_finished(config, spec, done, record_outs[i], model_outs[i])
        if record is not None:
            curve = list(record.get("train_loss", []))
            log.info("run %s: restored from an earlier attempt of its group (%s)", spec.key, done)
        else:
            record, curve = finetune_run(config, spec, record_out=record_outs[i], model_out=model_outs[i],
                                         checkpoint_path=checkpoint_paths[i], **inputs)
            if len(specs) > 1:
                done.mkdir(parents=True, exist_ok=True)
                shutil.copy2(model_outs[i], done / "model.pt")
                shutil.copy2(record_outs[i], done / "record.json")  # last: its presence means both are whole
        if on_record is not None:
            on_record(spec, record, curve)
        records.append(record)
    for path in checkpoint_paths:
        shutil.rmtree(Path(path).parent / "done", ignore_errors=True)
    return records


def _restore_finished(config: Mapping, spec: RunSpec, done: Path, record_out, model_out) -> dict | None:
    """A run finished by an earlier attempt of its group, copied back to its outputs; None
    when there is none, or when it ran under another config (then it is removed)."""
    import shutil

    from .results import read_record

    kept = done / "record.json"
    if not kept.exists() or not (done / "model.pt").exists():
        return None
    record = read_record(kept)
    if record.get("run_key") != spec.key or record.get("config_json") != json.dumps(run_config(config, spec), sort_keys=True):
        log.warning("run %s: %s holds a run of another config; training again", spec.key, done)
        shutil.rmtree(done, ignore_errors=True)
        return None
    Path(model_out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(done / "model.pt", model_out)
    write_record(record_out, record)
    return record


def activation_table(config: Mapping, source: str, source_model, target_dir, finetuned: Mapping[str, Any], out_path) -> int:
    """Fig. 4's table: R² per unit for every fine-tuned model of ``finetuned`` (label ->
    path of the classifier saved by :func:`finetune_run`), on the target's test images."""
    import pandas as pd
    import pyarrow as pa

    from .analysis import unit_r2
    from .results import R2_SCHEMA

    fig = config["figures"]["activations"]
    set_determinism(0, threads=config["finetune"]["threads"])
    pretrained, _ = load_source(source_model)
    images = load_task(target_dir).x["test"][: fig["max_images"]]
    rows = []
    for label, path in finetuned.items():
        method, setting = label.split(":")
        blob = load_sealed(path)
        model = build_model(blob["arch"], blob["num_classes"], blob["in_channels"])
        model.load_state_dict(blob["state_dict"])
        for row in unit_r2(pretrained.backbone, model.backbone, images):
            rows.append({"source": source, "target": fig["target"], "method": method, "setting": setting,
                         "replicate": 0, **row})
        log.info("R² of %s: %d units", label, len(rows))
    table = pa.Table.from_pylist(rows, schema=R2_SCHEMA)
    pd.DataFrame(table.to_pandas()).to_parquet(out_path, index=False)
    return len(rows)


def overhead_table(archs, penalties, options: Mapping, out_path, *, image_size: int, in_channels: int, num_classes: int) -> int:
    """Section 4.4.1's table for each architecture: one training step with each penalty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .analysis import step_overhead
    from .results import OVERHEAD_SCHEMA

    rows = []
    for arch in dict.fromkeys(archs):
        rows += step_overhead(arch, penalties, num_classes=num_classes, in_channels=in_channels,
                              image_size=image_size, batch_size=options["batch_size"], repeats=options["repeats"])
    pq.write_table(pa.Table.from_pylist(rows, schema=OVERHEAD_SCHEMA), out_path)
    for r in rows:
        log.info("%s %s: step %.3g FLOPs, penalty %.3g FLOPs (%.3f%%), %.2f ms/step", r["arch"], r["penalty"],
                 r["step_flops"], r["penalty_flops"], 100 * r["flops_ratio"], 1000 * r["step_seconds"])
    return len(rows)
