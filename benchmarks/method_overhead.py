#!/usr/bin/env python
"""Cost of every method of the registry in one training step, against ``none``, beside the
peer implementation of the same method, measured side by side in one process.

spbench's step is :func:`spbench.train.training_step`: forward with the method's taps (and,
for the methods that need it, ONE no-grad forward of the frozen source network) →
cross-entropy + the method's loss term → backward → ``add_grad_`` → SGD-momentum step →
``prox_``. The PEER step is the same method as it is usually written in public
transfer-learning code: the regulariser is a loss term summed in a Python loop and
differentiated by autograd (the penalties: Σ over ``named_parameters()`` of ‖w − w0‖²-style
terms, ``w0`` in a plain dict), and a method that looks at the source network runs a second
full forward of a copy of it every step with autograd on (LwF, DELTA).

All variants share one model and optimizer (state reset between variants is not needed: the
step time does not depend on the weights), are warmed up, and are timed interleaved: in every
repeat each variant runs ``--steps`` steps in a rotating order, so drift and background load
hit them alike. Reported per method: median step time, overhead vs ``none`` (median of the
per-repeat paired differences, with the range over repeats), the same for the peer step, and
the forwards each step ran (counted by hooks: the fine-tuned backbone's, the frozen network's,
and whether the latter ran without autograd).

Usage:  python benchmarks/method_overhead.py [--quick] [--json] [--device cuda] [--arch resnet50] ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from spbench.methods import METHODS, Forward, MethodContext, make_method, record_outputs
from spbench.methods.penalties import PenaltyMethod
from spbench.models import build_model, split_parameters
from spbench.pipeline import device_name as describe_device
from spbench.train import training_step


class Counter:
    """Counts the forwards of a module and whether autograd was on during them."""

    def __init__(self, module: nn.Module):
        self.calls, self.with_grad = 0, 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1
        self.with_grad += int(torch.is_grad_enabled())

    def reset(self):
        self.calls, self.with_grad = 0, 0


def peer_step(model, method, teacher_copy, x, y, opt, lr):
    """The method as peers write it: the regulariser as a loss term built in Python and
    differentiated by autograd; the source network's outputs from a second full forward
    (autograd on) every step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    with record_outputs(model, method.taps) as taps:
        features = model.backbone(x)
        logits = model.head(features)
    out = Forward(x, y, features, logits, taps=dict(taps))
    loss = F.cross_entropy(logits, y)
    if isinstance(method, PenaltyMethod):
        loss = loss + method.penalty.value()  # Σ over tensors in Python, through autograd
    else:
        if method.needs.teacher:
            with record_outputs(teacher_copy, method.taps) as t_taps:
                out.teacher_logits = teacher_copy(x)  # autograd on, as in the peers' code
            out.teacher_taps = {k: v.detach() for k, v in t_taps.items()}
            out.teacher_logits = out.teacher_logits.detach()
        term = method.loss(out)
        if term is not None:
            loss = loss + term
    loss.backward()
    if not isinstance(method, PenaltyMethod):
        method.add_grad_()  # DELTA's β on the head: an in-place decay in the peers' code too
    opt.step()
    method.prox_(lr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: every method)")
    parser.add_argument("--quick", action="store_true", help="demo network, 16x16x1, 2 repeats: seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.image, args.repeats, args.steps = "demo_resnet", 16, 2, 1
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    channels = 1 if args.arch == "demo_resnet" else 3
    torch.manual_seed(0)
    source = build_model(args.arch, 1000 if args.arch != "demo_resnet" else 7, channels).to(dev).eval()
    model = build_model(args.arch, args.classes, channels).to(dev)
    model.backbone.load_state_dict(source.backbone.state_dict())
    inherited, head = split_parameters(model)
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in inherited.items()}
    context = MethodContext(model, inherited, head, source_model=source, fisher=fisher)
    names = [m for m in (args.methods.split(",") if args.methods else sorted(METHODS)) if m and m != "none"]
    names.insert(0, "none")
    methods = {n: make_method(n, context).to(dev) for n in names}
    x = torch.randn(args.batch, channels, args.image, args.image, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    teacher_copy = build_model(args.arch, source.head.out_features, channels).to(dev).eval()
    teacher_copy.load_state_dict(source.state_dict())
    opt = torch.optim.SGD(list(model.parameters()), lr=1e-4, momentum=0.9)
    student = Counter(model.backbone)
    frozen = {n: Counter(m.teacher) for n, m in methods.items() if "teacher" in m._modules}
    peer_frozen = Counter(teacher_copy)
    # The set-up passes (DELTA's attention, Co-Tuning's relationship) are one-off costs, not a
    # step's: they are not run; their state keeps its initial value, which costs the same.

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def spb(name):
        def run():
            training_step(model, methods[name], x, y, opt, lr=1e-4)
        return run

    def peer(name):
        def run():
            peer_step(model, methods[name], teacher_copy, x, y, opt, 1e-4)
        return run

    variants = {}
    for n in names:
        variants[("spbench", n)] = spb(n)
        if n != "none":
            variants[("peer", n)] = peer(n)
    forwards = {}
    for key, run in variants.items():  # warm-up, and the forward counts of one step
        student.reset()
        peer_frozen.reset()
        for c in frozen.values():
            c.reset()
        run()
        sync()
        teacher = frozen.get(key[1]) if key[0] == "spbench" else peer_frozen
        forwards[key] = {
            "backbone": student.calls,
            "frozen_network": teacher.calls if teacher is not None else 0,
            "frozen_with_autograd": teacher.with_grad if teacher is not None else 0,
        }
    times = {key: [] for key in variants}
    keys = list(variants)
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[key]()
            sync()
            times[key].append((time.perf_counter() - t0) / args.steps)
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
    base = times[("spbench", "none")]
    rows = []
    for n in names:
        row = {"method": n, "step_seconds": statistics.median(times[("spbench", n)])}
        for kind in ("spbench", "peer"):
            if (kind, n) not in times:
                continue
            diffs = [100 * (t - b) / b for t, b in zip(times[(kind, n)], base)]
            row[f"{kind}_overhead_percent"] = statistics.median(diffs)
            row[f"{kind}_overhead_range"] = [min(diffs), max(diffs)]
            row[f"{kind}_forwards"] = forwards[(kind, n)]
        if ("peer", n) in times:
            row["peer_step_seconds"] = statistics.median(times[("peer", n)])
        rows.append(row)
    device_name = describe_device(dev)
    result = {"device": device_name, "torch": torch.__version__, "arch": args.arch, "image_size": args.image,
              "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"# {args.arch}, {args.image}px, batch {args.batch}, {device_name}, torch {torch.__version__}; "
          f"{args.repeats} repeats x {args.steps} steps, interleaved")
    print("| method | step (s) | overhead vs none | frozen-network forwards (no-grad) | peer overhead | peer frozen forwards (autograd) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["method"] == "none":
            print(f"| none | {row['step_seconds']:.4g} | — | 0 | — | — |")
            continue
        lo, hi = row["spbench_overhead_range"]
        f = row["spbench_forwards"]
        pf = row["peer_forwards"]
        plo, phi = row["peer_overhead_range"]
        print(f"| {row['method']} | {row['step_seconds']:.4g} | {row['spbench_overhead_percent']:+.1f}% [{lo:+.1f}, {hi:+.1f}] | "
              f"{f['frozen_network']} ({f['frozen_network'] - f['frozen_with_autograd']}) | "
              f"{row['peer_overhead_percent']:+.1f}% [{plo:+.1f}, {phi:+.1f}] | {pf['frozen_network']} ({pf['frozen_with_autograd']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
