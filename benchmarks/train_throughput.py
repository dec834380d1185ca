#!/usr/bin/env python
"""Training throughput: spbench's real fine-tuning loop against a bare loop on the same model.

Both variants train the same network (one model per freeze depth, in train mode) on the same
device, under the same precision, measured side by side in one process:

  spbench  spbench.train.train_steps, the loop a fine-tuning job runs: the seeded batch order
           (batch_indices), the training batch read from the uint8 cache by the CachedImages
           training view with the paper's augmentation (random crop, mirror, blur, mean
           subtraction; spbench.augment), then training_step with the l2_sp penalty
           (alpha 0.1, beta 0.01) and SGD momentum 0.9, the learning-rate schedule and the
           loss check of every step
  bare     the upper bound: one synthetic batch already on the device, SGD (momentum 0.9,
           the same kernel as spbench's: spbench.train.sgd, fused on CUDA), forward /
           cross-entropy / backward / step under the same autocast; no penalty, no input
           pipeline, no per-step bookkeeping

With --freeze (a list of depths, default 0) both variants are measured once per depth on a
model whose first units are frozen as a fine-tune of that depth freezes them
(spbench.models.apply_freeze, their batch norms in eval mode): Fig. 3's runs, which train
faster than a full fine-tune since frozen units run no backward. `make plan` prices the runs
of each depth at the rate measured at that depth (or at the deepest measured depth below it).

With --compile the model's backbone is compiled by torch.compile, as finetune.compile does
(spbench.models.compile_backbone), for both variants; the warm-up steps (at least 2) take the
compilation, which is not timed. `make plan` prices a config at the rates measured with its
own finetune.compile.

The cache is a synthetic prepared task written to a temporary folder in the on-disk layout of
spbench.data (images.npy uint8 [N, H, W, C], split.parquet, meta.json), stored at --stored
pixels (default 8/7 of the crop: 256 for a 224 crop) so the random crop has room to move, and
read through spbench.augment.load_task_views as a job reads it.

For every precision (--precisions, default fp32,bf16) each variant is warmed up, then timed
interleaved: in every repeat each (depth, precision, variant) runs --steps steps, in a rotating
order, so drift and background load hit them alike; on CUDA the device is synchronised around
every timed region. Reported, per freeze depth and precision: images/s of each (median over
repeats) and their ratio spbench / bare (with the range of the per-repeat paired ratios).

Usage:  python benchmarks/train_throughput.py [--quick] [--json] [--arch resnet50] [--device cuda]
                                             [--freeze 0,8,16] [--compile] ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spbench.augment import load_task_views
from spbench.pipeline import device_name as describe_device
from spbench.methods import MethodContext, make_method
from spbench.models import apply_freeze, build_model, compile_backbone, freeze_depth_count, split_parameters
from spbench.train import resolve_precision, set_train_mode, sgd, train_steps

ARCHS = ("demo_resnet", "resnet18", "resnet50", "resnet101")
VARIANTS = ("spbench", "bare")
ALPHA, BETA = 0.1, 0.01


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, choices=ARCHS, help="network (default resnet50; demo_resnet with --quick)")
    ap.add_argument("--image", type=int, default=None, help="crop size (default 224; 16 for demo_resnet)")
    ap.add_argument("--stored", type=int, default=None, help="stored image size of the cache (default 8/7 of --image)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32; 64 on CUDA)")
    ap.add_argument("--images", type=int, default=None, help="training images in the cache (default 4 batches, at least 64)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="steps per variant per repeat (default 5; 2 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 5; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the repeats")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU, torch's default on CUDA)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (fp16: CUDA only)")
    ap.add_argument("--freeze", default="0",
                    help="comma-separated freeze depths, each measured on its own (default 0: a full fine-tune)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the backbone, as finetune.compile (compiled in the warm-up steps)")
    ap.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                    help="model memory format, as finetune.channels_last (auto: on CUDA only)")
    ap.add_argument("--quick", action="store_true", help="demo network, few steps, two repeats: seconds")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--json-file", help="also write that JSON object to this file (the table is printed)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.quick:
        args.arch = args.arch or "demo_resnet"
        args.steps = args.steps or 2
        args.repeats = args.repeats or 2
        args.warmup = min(args.warmup, 1)
    args.arch = args.arch or "resnet50"
    args.image = args.image or (16 if args.arch == "demo_resnet" else 224)
    args.stored = args.stored or max(args.image, round(args.image * 8 / 7))
    args.batch = args.batch or (8 if args.quick else 64 if dev.type == "cuda" else 32)
    args.images = args.images or max(4 * args.batch, 64)
    args.steps = args.steps or 5
    args.repeats = args.repeats or 5
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if args.compile:
        args.warmup = max(args.warmup, 2)  # the first calls compile (and, in train mode, recompile once)
    if min(args.image, args.batch, args.images, args.steps, args.repeats, args.classes) < 1 or args.warmup < 0:
        ap.error("--image, --batch, --images, --steps, --repeats, --classes must be >= 1, --warmup >= 0")
    if args.stored < args.image:
        ap.error("--stored must be at least --image")
    bad = [p for p in args.precisions if p not in ("fp32", "bf16", "fp16")]
    if bad or not args.precisions:
        ap.error(f"--precisions: fp32, bf16, fp16, not {bad or args.precisions}")
    try:
        args.freeze = sorted({int(d) for d in args.freeze.split(",") if d.strip()})
    except ValueError:
        ap.error(f"--freeze: comma-separated integers, not {args.freeze!r}")
    units = freeze_depth_count(args.arch)
    if not args.freeze or not all(0 <= d <= units for d in args.freeze):
        ap.error(f"--freeze: depths in [0, {units}] ({args.arch} has {units} freeze units), not {args.freeze}")
    if args.threads is None:
        args.threads = 1 if dev.type == "cpu" else torch.get_num_threads()
    return args


def write_task(folder: Path, *, train: int, test: int, size: int, channels: int, classes: int, seed: int = 0) -> Path:
    """A synthetic prepared task in spbench.data's on-disk layout: random uint8 images."""
    rng = np.random.default_rng(seed)
    n = train + test
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n)
    split = np.array(["train"] * train + ["test"] * test)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    pd.DataFrame({"index": np.arange(n), "label": labels, "split": split}).to_parquet(folder / "split.parquet", index=False)
    mean = (images[:train].astype(np.float64) / 255.0).mean(axis=(0, 1, 2)).tolist()
    meta = {"classes": [f"c{k}" for k in range(classes)], "num_classes": classes, "image_size": [size, size],
            "channels": channels, "mean": mean, "counts": {"train": train, "test": test}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    precisions = {name: resolve_precision(name, dev) for name in args.precisions}
    channels = 1 if args.arch == "demo_resnet" else 3
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and dev.type == "cuda")

    def network(depth: int) -> dict:
        """The model of one freeze depth (the same initial weights for every depth), its l2_sp
        penalty over the trainable inherited parameters, and the bare loop's optimizer."""
        torch.manual_seed(0)
        model = build_model(args.arch, args.classes, channels).to(dev)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        apply_freeze(model, depth)
        inherited, head = split_parameters(model)
        method = make_method("l2_sp", MethodContext(model, inherited, head), alpha=ALPHA, beta=BETA).to(dev)
        if args.compile:
            compile_backbone(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return {"model": model, "method": method, "trainable": sum(p.numel() for p in trainable),
                "opt": sgd(trainable, lr=args.lr, momentum=0.9)}  # spbench's kernel choice (fused on CUDA)

    nets = {depth: network(depth) for depth in args.freeze}

    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        task = write_task(Path(tmp) / "task", train=args.images, test=min(args.images, 16), size=args.stored,
                          channels=channels, classes=args.classes)
        augment_gen = torch.Generator().manual_seed(1)
        batch_gen = torch.Generator().manual_seed(2)
        _, xs, ys = load_task_views(task, crop=args.image, generator=augment_gen, device=dev)
        x_train, y_train = xs["train"], ys["train"].to(dev)

        bx = torch.randn(args.batch, channels, args.image, args.image, device=dev)
        by = torch.randint(0, args.classes, (args.batch,), device=dev)

        def spbench_run(depth, precision, steps):
            net = nets[depth]
            history = train_steps(net["model"], net["method"], x_train, y_train, steps=steps, batch_size=args.batch,
                                  lr=args.lr, momentum=0.9, freeze=depth, generator=batch_gen, log_every=0,
                                  precision=precision)
            return history.images

        def bare_run(depth, precision, steps):
            model, opt = nets[depth]["model"], nets[depth]["opt"]
            scaler = precision.scaler()
            set_train_mode(model, depth, "train")  # as spbench's loop: frozen units' batch norms in eval mode
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                with precision.autocast():
                    loss = F.cross_entropy(model(bx), by)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
            return steps * args.batch

        runs = {"spbench": spbench_run, "bare": bare_run}
        keys = [(d, p, v) for d in args.freeze for p in precisions for v in VARIANTS]
        for d, p, v in keys:  # warm-up: kernels chosen, buffers and momentum allocated
            if args.warmup:
                runs[v](d, precisions[p], args.warmup)
        sync()
        rates = {key: [] for key in keys}
        for r in range(args.repeats):
            order = keys[r % len(keys):] + keys[: r % len(keys)]
            for d, p, v in order:
                sync()
                t0 = time.perf_counter()
                images = runs[v](d, precisions[p], args.steps)
                sync()
                rates[(d, p, v)].append(images / (time.perf_counter() - t0))
            log(f"repeat {r + 1}/{args.repeats}")

    rows = []
    for d, p in ((d, p) for d in args.freeze for p in precisions):
        sp, bare = rates[(d, p, "spbench")], rates[(d, p, "bare")]
        paired = [a / b for a, b in zip(sp, bare)]
        sp_med, bare_med = statistics.median(sp), statistics.median(bare)
        rows.append({
            "freeze": d,
            "trainable_parameters": nets[d]["trainable"],
            "precision": p,
            "spbench_images_per_s": sp_med,
            "bare_images_per_s": bare_med,
            "ratio": sp_med / bare_med,
            "ratio_range": [min(paired), max(paired)],
            "spbench_step_ms": 1000 * args.batch / sp_med,
            "bare_step_ms": 1000 * args.batch / bare_med,
            "per_repeat": {"spbench": sp, "bare": bare},
        })
    device_name = describe_device(dev)  # as the run records name it, so that `make plan` merges both
    result = {
        "device": str(dev), "device_name": device_name, "torch": torch.__version__, "arch": args.arch,
        "image_size": args.image, "stored_size": args.stored, "channels": channels, "batch": args.batch,
        "train_images": args.images, "classes": args.classes, "steps": args.steps, "repeats": args.repeats,
        "warmup": args.warmup, "threads": args.threads, "channels_last": channels_last, "freeze": args.freeze,
        "compile": args.compile,
        "method": "l2_sp", "alpha": ALPHA, "beta": BETA, "lr": args.lr, "rows": rows,
    }
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"# {args.arch}, crop {args.image}px from {args.stored}px uint8 cache ({channels} channel"
          f"{'s' if channels != 1 else ''}), batch {args.batch}{', compiled' if args.compile else ''}; {device_name}, "
          f"torch {torch.__version__}; {args.repeats} repeats x {args.steps} steps, interleaved")
    table = pd.DataFrame({
        "freeze": [str(row["freeze"]) for row in rows],
        "precision": [row["precision"] for row in rows],
        "spbench (images/s)": [f"{row['spbench_images_per_s']:.4g}" for row in rows],
        "bare (images/s)": [f"{row['bare_images_per_s']:.4g}" for row in rows],
        "spbench / bare": [f"{row['ratio']:.2f}" for row in rows],
        "range over repeats": ["[{:.2f}, {:.2f}]".format(*row["ratio_range"]) for row in rows],
    })
    if args.freeze == [0]:  # a full fine-tune only: the table as before the option
        table = table.drop(columns="freeze")
    colalign = ["left" if c == "precision" else "right" for c in table.columns]  # the numbers to the right
    print(table.to_markdown(index=False, colalign=colalign, disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
