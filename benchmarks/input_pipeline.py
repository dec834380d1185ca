#!/usr/bin/env python
"""Input pipeline throughput: training batches from the uint8 cache vs from JPEG files via PIL.

Both paths produce the same thing — float32 [B, 3, 224, 224] training batches with the paper's
augmentation (random blur, random mirror, random 224 crop, mean subtraction; SPEC §4) — from the
same images, on one CPU thread (images/s per core):

  cache    spbench.augment: the selected rows of the memory-mapped uint8 cache
           (256x256x3, decoded once), augmented batch-wise by augment_batch on the CPU
  cache_read  only the CPU's share when the augmentation runs on the accelerator (the
           workflow's setting on a GPU): the rows read from the cache into a uint8 tensor
  jpeg     the usual per-image path: PIL open + decode + RGB + resize to 256x256, random crop,
           mirror, Gaussian blur (PIL), to a tensor, mean subtracted; then stacked

Also reported: the one-off cost of building the cache (decode + resize + write, per image).

The images are generated: smooth random fields saved as JPEG (quality 90) at --width x --height
(default 500x375, ImageNet's typical size), so decode cost is realistic. Each measurement reads
--batches random batches of --batch images; --repeats runs, interleaved, the median reported.
The OS file cache is warm for both paths (the files are read once before timing).

Usage:  python benchmarks/input_pipeline.py [--quick] [--json] [--images N] ...
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
import torch

from spbench.augment import CachedImages
from spbench.datasets import FileListTask
from spbench.pipeline import device_name

MEASURES = ("cache", "cache_read", "jpeg")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="JPEG files generated (default 256; 48 with --quick)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64; 16 with --quick)")
    ap.add_argument("--batches", type=int, default=None, help="batches per measurement (default 4; 2 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3; 1 with --quick)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="few images, one repeat (smoke test)")
    args = ap.parse_args(argv)
    args.images = args.images or (48 if args.quick else 256)
    args.batch = args.batch or (16 if args.quick else 64)
    args.batches = args.batches or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if min(args.images, args.batch, args.batches, args.repeats) < 1:
        ap.error("--images, --batch, --batches, --repeats must be >= 1")
    return args


def make_jpegs(folder: Path, n: int, width: int, height: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        name = f"img_{i:05d}.jpg"
        img.save(folder / name, "JPEG", quality=90)
        names.append(name)
    return names


def jpeg_batch(paths: list[str], rng: np.random.Generator, mean: torch.Tensor, crop: int = 224) -> torch.Tensor:
    """The per-image PIL pipeline (what a torchvision Dataset + transforms does per item)."""
    from PIL import Image, ImageFilter

    out = []
    for p in paths:
        with Image.open(p) as im:
            img = im.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
        oy, ox = rng.integers(0, 256 - crop + 1, 2)
        img = img.crop((ox, oy, ox + crop, oy + crop))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 1.5))))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        out.append(x.sub_(mean.view(3, 1, 1)))
    return torch.stack(out)


def run(args: argparse.Namespace) -> dict:
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    torch.set_num_threads(1)
    n, b = args.images, args.batch
    with tempfile.TemporaryDirectory(prefix="spbench-input-") as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        (tmp / "task").mkdir()
        log(f"generating {n} JPEGs of {args.width}x{args.height} ...")
        names = make_jpegs(tmp / "jpeg", n, args.width, args.height)
        jpeg_bytes = sum((tmp / "jpeg" / f).stat().st_size for f in names)
        t0 = time.perf_counter()
        FileListTask(root=tmp / "jpeg", files=names, labels=np.zeros(n), split=np.array(["train"] * n),
                     classes=["x"]).write(tmp / "task")
        build_s = time.perf_counter() - t0
        meta = json.loads((tmp / "task" / "meta.json").read_text())
        mean = torch.tensor(meta["mean"], dtype=torch.float32)
        images = np.load(tmp / "task" / "images.npy", mmap_mode="r")
        view = CachedImages(images, np.arange(n), mean=mean, crop=224, train=True,
                            generator=torch.Generator().manual_seed(0))
        paths = [str(tmp / "jpeg" / f) for f in names]
        rng = np.random.default_rng(1)
        idx_gen = torch.Generator().manual_seed(2)

        def cache():
            for _ in range(args.batches):
                view[torch.randint(0, n, (b,), generator=idx_gen)]

        def jpeg():
            for _ in range(args.batches):
                jpeg_batch([paths[i] for i in rng.integers(0, n, b)], rng, mean)

        def cache_read():
            for _ in range(args.batches):
                rows = np.sort(torch.randint(0, n, (b,), generator=idx_gen).numpy())
                torch.from_numpy(images[rows])

        fns = {"cache": cache, "cache_read": cache_read, "jpeg": jpeg}
        for p in paths:  # warm the OS file cache for the JPEG path too
            Path(p).read_bytes()
        for name in MEASURES:  # warm-up
            fns[name]()
        seconds = {m: [] for m in MEASURES}
        start = time.perf_counter()
        for r in range(args.repeats):
            for name in (MEASURES if r % 2 == 0 else MEASURES[::-1]):
                t = time.perf_counter()
                fns[name]()
                seconds[name].append(time.perf_counter() - t)
            log(f"repeat {r + 1}/{args.repeats} done")
        cache_mb = (tmp / "task" / "images.npy").stat().st_size / 1e6

    per = args.batches * b
    med = {m: statistics.median(s) for m, s in seconds.items()}
    rows = [{"measure": m, "median_s": med[m], "seconds_per_repeat": seconds[m], "images_per_s": per / med[m],
             "ms_per_image": 1e3 * med[m] / per} for m in MEASURES]
    return {
        "benchmark": "input_pipeline",
        "device": "cpu",
        "device_name": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": n,
        "source_size": [args.width, args.height],
        "jpeg_mb": jpeg_bytes / 1e6,
        "cache_mb": cache_mb,
        "batch": b,
        "batches": args.batches,
        "repeats": args.repeats,
        "cache_build_images_per_s": n / build_s,
        "speedup_cache_over_jpeg": med["jpeg"] / med["cache"],
        "speedup_cache_read_over_jpeg": med["jpeg"] / med["cache_read"],
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }


DESCRIPTIONS = {
    "cache": "uint8 cache (memmap) + batch augmentation on the CPU (spbench.augment)",
    "cache_read": "uint8 cache (memmap) read only (augmentation on the accelerator)",
    "jpeg": "JPEG files via PIL: decode, resize, crop, mirror, blur per image",
}


def print_table(res: dict) -> None:
    w, h = res["source_size"]
    print(f"\ninput_pipeline: {res['images']} images ({w}x{h} JPEG, {res['jpeg_mb']:.1f} MB; cache "
          f"{res['cache_mb']:.1f} MB), batches of {res['batch']} -> float32 [B,3,224,224], "
          f"{res['batches']} batches x {res['repeats']} repeats (interleaved, median)")
    print(f"device: {res['device_name']}, torch {res['torch']}\n")
    hdr = f"{'path':<10} {'what':<70} {'images/s/core':>13} {'ms/image':>9}"
    print(hdr)
    print("-" * len(hdr))
    for row in res["rows"]:
        print(f"{row['measure']:<10} {DESCRIPTIONS[row['measure']]:<70} {row['images_per_s']:13.1f} {row['ms_per_image']:9.2f}")
    print(f"\nspeed-up over jpeg: cache {res['speedup_cache_over_jpeg']:.1f}x, cache_read "
          f"{res['speedup_cache_read_over_jpeg']:.1f}x; building the cache once: "
          f"{res['cache_build_images_per_s']:.1f} images/s; wall time {res['wall_s']:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
