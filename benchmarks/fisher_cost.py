#!/usr/bin/env python
"""Cost of the Fisher diagonal (spbench.fisher.estimate_fisher) against gradient work of known size.

Over the same m random images, in the same process, interleaved (every repeat runs each
measurement once, in a rotating order; one warm-up run of each first), this times:

  fwd_bwd        a plain forward + backward of the mean cross-entropy over minibatches of --batch
                 (eval mode, as the estimator; random labels)
  k_grads        K per-example gradients per image, the straightforward way: for each class k,
                 torch.func vmap(grad(log p_k(x; w))) over a minibatch (the exact estimator's
                 unit of work, without its weighting and accumulation)
  fisher_exact   estimate_fisher(..., estimator='exact')
  fisher_mc1     estimate_fisher(..., estimator='mc', samples=1)
  train_b1       one training step per image: forward + backward + SGD-momentum step on a batch
                 of one image (train mode, on a copy of the network)
  train_batch    training steps on minibatches of --batch (train mode, on a copy), per image

Gradients are taken with respect to every backbone parameter, as the workflow's Fisher job
does. The network is randomly initialised (its batch-norm statistics are first moved off
their defaults by a few forward passes); weights do not change the cost.

Reported: images/s of each (m / median seconds), and the cost ratios (seconds per image)
exact / k_grads, mc1 / train_b1 and mc1 / train_batch.

Usage:  python benchmarks/fisher_cost.py [--quick] [--json] [--device cuda] ...
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from spbench.fisher import estimate_fisher
from spbench.models import build_model
from spbench.pipeline import device_name

MEASURES = ("fwd_bwd", "k_grads", "fisher_exact", "fisher_mc1", "train_b1", "train_batch")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="demo_resnet")
    ap.add_argument("--classes", type=int, default=7, help="K, the source classes (default 7)")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--images", type=int, default=None, help="m, images per measurement (default 256; 8 with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="minibatch / vmap chunk (default 64; 4 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 5; 1 with --quick)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 with --device cpu, as several threads spin against each other "
                         "on a busy machine; torch's default with --device cuda)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="few images, one repeat (smoke test)")
    args = ap.parse_args(argv)
    args.images = args.images or (8 if args.quick else 256)
    args.batch = args.batch or (4 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if min(args.images, args.batch, args.repeats, args.classes) < 1:
        ap.error("--images, --batch, --repeats, --classes must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    K, m, b = args.classes, args.images, args.batch

    model = build_model(args.arch, K, args.channels).to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(m, args.channels, args.image_size, args.image_size, generator=gen).to(device)
    labels = torch.randint(0, K, (m,), generator=gen).to(device)
    with torch.no_grad():  # batch-norm statistics off their defaults
        model.train()
        for start in range(0, min(m, 4 * b), b):
            model(images[start : start + b])
    model.eval()
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    n_elements = sum(p.numel() for n, p in model.named_parameters() if n in names)
    mc_gen = torch.Generator(device=device).manual_seed(2)

    # (b) K per-example gradients per image, the straightforward way.
    all_params = dict(model.named_parameters())
    params = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in params}
    buffers = dict(model.named_buffers())

    def log_prob(p, x, k):
        logits = functional_call(model, ({**frozen, **p}, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits[0], dim=-1).gather(0, k.reshape(1))[0]

    per_example_grad = vmap(grad(log_prob), in_dims=(None, 0, 0))

    def fwd_bwd():
        for start in range(0, m, b):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[start : start + b]), labels[start : start + b]).backward()
        model.zero_grad(set_to_none=True)

    def k_grads():
        for start in range(0, m, b):
            x = images[start : start + b]
            for k in range(K):
                per_example_grad(params, x, torch.full((len(x),), k, device=device))

    def fisher_exact():
        estimate_fisher(model, images, names, estimator="exact", batch_size=b)

    def fisher_mc1():
        estimate_fisher(model, images, names, estimator="mc", samples=1, batch_size=b, generator=mc_gen)

    def trainer(batch: int) -> Callable[[], None]:
        net = copy.deepcopy(model).train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def train():
            for start in range(0, m, batch):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(images[start : start + batch]), labels[start : start + batch]).backward()
                opt.step()

        return train

    fns = {
        "fwd_bwd": fwd_bwd,
        "k_grads": k_grads,
        "fisher_exact": fisher_exact,
        "fisher_mc1": fisher_mc1,
        "train_b1": trainer(1),
        "train_batch": trainer(b),
    }

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    log(f"{args.arch}, K={K}, {args.image_size}x{args.image_size}x{args.channels}, m={m}, batch {b}, "
        f"{device_name(device)}")
    t_start = time.perf_counter()
    for n in MEASURES:  # warm-up
        timed(fns[n])
    log(f"warm-up done in {time.perf_counter() - t_start:.1f} s")
    seconds = {n: [] for n in MEASURES}
    for r in range(args.repeats):
        order = MEASURES[r % len(MEASURES):] + MEASURES[: r % len(MEASURES)]
        for n in order:
            seconds[n].append(timed(fns[n]))
        log(f"repeat {r + 1}/{args.repeats} done at {time.perf_counter() - t_start:.1f} s")

    med = {n: statistics.median(s) for n, s in seconds.items()}
    rows = [
        {
            "measure": n,
            "median_s": med[n],
            "seconds_per_repeat": seconds[n],
            "images_per_s": m / med[n],
            "ms_per_image": 1e3 * med[n] / m,
        }
        for n in MEASURES
    ]
    return {
        "benchmark": "fisher_cost",
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "arch": args.arch,
        "classes": K,
        "image_size": args.image_size,
        "channels": args.channels,
        "images": m,
        "batch": b,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "fisher_params": "all backbone parameters",
        "fisher_elements": n_elements,
        "ratios": {
            "exact_over_k_grads": med["fisher_exact"] / med["k_grads"],
            "mc1_over_train_b1": med["fisher_mc1"] / med["train_b1"],
            "mc1_over_train_batch": med["fisher_mc1"] / med["train_batch"],
        },
        "ratio_note": "ratios of seconds per image (cost ratios: > 1 means the numerator is slower)",
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }


DESCRIPTIONS = {
    "fwd_bwd": "forward+backward, mean loss, minibatches (eval)",
    "k_grads": "K per-example grads per image (vmap(grad) per class)",
    "fisher_exact": "estimate_fisher exact",
    "fisher_mc1": "estimate_fisher mc, S=1",
    "train_b1": "training step per image (batch 1, fwd+bwd+SGD)",
    "train_batch": "training steps on minibatches, per image",
}


def print_table(res: dict) -> None:
    print(f"\nfisher_cost: {res['arch']}, K={res['classes']} classes, {res['image_size']}x{res['image_size']}x{res['channels']}, "
          f"m={res['images']} images, batch {res['batch']}, {res['repeats']} repeats (interleaved), "
          f"{res['fisher_elements']:,} Fisher elements ({res['fisher_params']})")
    print(f"device: {res['device_name']}, torch {res['torch']}\n")
    hdr = f"{'measure':<14} {'what':<52} {'images/s':>10} {'ms/image':>10}"
    print(hdr)
    print("-" * len(hdr))
    for row in res["rows"]:
        print(f"{row['measure']:<14} {DESCRIPTIONS[row['measure']]:<52} {row['images_per_s']:10.1f} {row['ms_per_image']:10.3f}")
    r = res["ratios"]
    print()
    print(f"cost ratios (seconds per image): exact / K per-example grads = {r['exact_over_k_grads']:.2f}; "
          f"mc(S=1) / training step per image (batch 1) = {r['mc1_over_train_b1']:.2f}; "
          f"mc(S=1) / minibatch training per image = {r['mc1_over_train_batch']:.2f}")
    print(f"wall time {res['wall_s']:.1f} s")


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
