#!/usr/bin/env python
"""Cost of DELTA's set-up pass (spbench.methods.features.channel_attention): the forward cut
at each tapped convolution against the whole forward per channel.

DELTA scores every channel of every tapped convolution (3,840 on a ResNet-50 or -101) by the
source probe's loss with that channel zeroed: one forward of the attention images per channel.
Where the backbone traces, spbench runs the part of the forward before the convolution once per
batch and only the rest per channel (``cut``); ``whole`` is the same pass with the tracing
turned off (``cut=False``), a whole forward per channel, as in DELTA's code. Both run in the same process on
the same random network and images, interleaved (every repeat runs each once, in a rotating
order, after one warm-up run of each), and must give the same weights, to the bit.

Reported: seconds per pass (median over repeats) of each, their ratio whole / cut, the number of
channels scored, and whether the weights agreed.

Usage:  python benchmarks/delta_setup.py [--arch resnet18] [--image 32] [--images 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from spbench.methods import SetupData
from spbench.methods import features
from spbench.models import build_model

VARIANTS = ("cut", "whole")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="backbone (default resnet18; demo_resnet with --quick)")
    ap.add_argument("--image", type=int, default=None, help="image side in px (default 32; 16 with --quick)")
    ap.add_argument("--images", type=int, default=None,
                    help="attention images (default 64; 8 with --quick; DELTA scores at most 256)")
    ap.add_argument("--batch", type=int, default=None, help="batch of the forwards (default 64; 4 with --quick)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; 1 with --quick)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on the CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="demo network, few images, one repeat (smoke test)")
    args = ap.parse_args(argv)
    args.arch = args.arch or ("demo_resnet" if args.quick else "resnet18")
    args.image = args.image or (16 if args.quick or args.arch == "demo_resnet" else 32)
    args.images = args.images or (8 if args.quick else 64)
    args.batch = args.batch or (4 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    channels_in = 1 if args.arch == "demo_resnet" else 3
    torch.manual_seed(0)
    network = build_model(args.arch, args.classes, channels_in).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.images, channels_in, args.image, args.image, generator=gen)
    y = torch.arange(args.images) % args.classes
    data = SetupData(x, y, batch_size=args.batch, device=device)
    layers = network.feature_layers()
    traced = all(features._cut_after(network.backbone, n.removeprefix("backbone.")) is not None for n in layers)

    def run(variant: str) -> tuple[float, list[torch.Tensor]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        weights = features.channel_attention(network, layers, data, args.classes, cut=variant == "cut")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began, [w.cpu() for w in weights]

    results = {v: run(v)[1] for v in VARIANTS}  # warm-up, and the weights compared
    same = all(torch.equal(a, b) for a, b in zip(results["cut"], results["whole"]))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS[r % 2:] + VARIANTS[: r % 2]:
            times[v].append(run(v)[0])
            print(f"repeat {r + 1}/{args.repeats}: {v} {times[v][-1]:.2f} s", file=sys.stderr)
    med = {v: statistics.median(t) for v, t in times.items()}
    res = {
        "arch": args.arch, "image": args.image, "images": args.images, "batch": args.batch,
        "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "layers": layers, "channels": sum(int(w.numel()) for w in results["cut"]), "traced": traced,
        "repeats": args.repeats, "cut_s": med["cut"], "whole_s": med["whole"],
        "whole_over_cut": med["whole"] / med["cut"], "same_weights": same,
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"delta_setup: {args.arch}, {args.images} images of {args.image}px, batch {args.batch}, {args.device}, "
              f"{res['threads']} thread(s), torch {res['torch']}; {res['channels']} channels in {len(layers)} layers; "
              f"median of {args.repeats} interleaved repeats")
        print(f"cut (forward before the tap once per batch)  {med['cut']:8.2f} s")
        print(f"whole (one whole forward per channel)        {med['whole']:8.2f} s")
        print(f"whole / cut                                  {res['whole_over_cut']:8.2f}")
        print(f"same weights, to the bit                    {'yes' if same else 'NO'}")
        if not traced:
            print("(the backbone does not trace: both variants ran the whole forward)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
