"""CUDA correctness of the library: run on a machine with a GPU.

Checks, each against a CPU reference:
- every penalty on a ResNet-101 (float32 on the GPU): the foreach fast path, the per-tensor
  loop and autograd of the explicit Ω give the same gradient;
- the proximal variants give the same weights on the GPU as on the CPU;
- the exact and Monte-Carlo Fisher estimators on the demo network (float64) agree with the CPU;
- a demo fine-tune (training loop, penalty, evaluation) runs on the GPU and its loss falls.

Prints one line per check and a JSON summary; exits 1 if any check fails.

    python benchmarks/cuda_check.py [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from spbench.fisher import estimate_fisher
from spbench.models import build_model, split_parameters
from spbench.penalties import PENALTIES, make_penalty
from spbench.train import train_steps


def _grads(params):
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def check_penalties(dev) -> dict:
    out = {}
    for name in sorted(PENALTIES):
        torch.manual_seed(0)
        model = build_model("resnet101", 10, 3).to(dev)
        inherited, head = split_parameters(model)
        fisher = {n: torch.rand_like(p) for n, p in inherited.items()} if PENALTIES[name].uses_fisher else None
        ab = (0.0, 0.0) if name == "none" else (0.1, 0.01)
        pen = make_penalty(name, inherited, head, alpha=ab[0], beta=ab[1], fisher=fisher, eps=0.05).to(dev)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        params = list(model.parameters())
        results = {}
        for mode in ("autograd", "loop", "foreach"):
            for p in params:
                p.grad = None
            if mode == "autograd":
                if name != "none":
                    pen.value().backward()
            else:
                pen.add_grad_(foreach=(mode == "foreach"))
            results[mode] = _grads(params)
        err = max(
            float((a - b).abs().max() / (b.abs().max() + 1e-12))
            for mode in ("loop", "foreach")
            for a, b in zip(results[mode], results["autograd"])
        )
        out[name] = err
        print(f"penalty {name:14s} max relative gradient error vs autograd: {err:.2e}", flush=True)
    return out


def check_prox(dev) -> dict:
    out = {}
    for name in ("l1_sp", "gl_sp", "gl_sp_fisher"):
        torch.manual_seed(1)
        cpu = build_model("resnet18", 10, 3).double()
        gpu = copy.deepcopy(cpu).to(dev)
        pens = []
        for m in (cpu, gpu):
            inh, head = split_parameters(m)
            fisher = {n: torch.ones_like(p) for n, p in inh.items()} if name.endswith("fisher") else None
            pens.append(make_penalty(name, inh, head, alpha=0.1, beta=0.0, fisher=fisher, variant="prox"))
        g = torch.Generator().manual_seed(2)
        noise = [0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in cpu.parameters()]
        with torch.no_grad():
            for p, q, n in zip(cpu.parameters(), gpu.parameters(), noise):
                p.add_(n)
                q.add_(n.to(dev))
        for pen in pens:
            pen.prox_(0.05)
        err = max(float((p - q.cpu()).abs().max()) for p, q in zip(cpu.parameters(), gpu.parameters()))
        out[name] = err
        print(f"prox {name:14s} max abs difference GPU vs CPU (float64): {err:.2e}", flush=True)
    return out


def check_fisher(dev) -> dict:
    torch.manual_seed(3)
    model = build_model("demo_resnet", 7, 1).double()
    x = torch.randn(40, 1, 16, 16, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    out = {}
    gm = copy.deepcopy(model).to(dev)
    for est in ("exact", "mc"):
        # the labels of the MC estimator are drawn by a CPU generator: same seed, same labels
        a = estimate_fisher(model, x, names, estimator=est, batch_size=16, generator=torch.Generator().manual_seed(0))
        b = estimate_fisher(gm, x.to(dev), names, estimator=est, batch_size=16, generator=torch.Generator().manual_seed(0))
        err = max(float((a[n] - b[n].cpu()).abs().max() / (a[n].abs().max() + 1e-30)) for n in names)
        out[est] = err
        print(f"fisher {est:5s} max relative difference GPU vs CPU: {err:.2e}", flush=True)
    return out


def check_training(dev) -> dict:
    torch.manual_seed(4)
    model = build_model("demo_resnet", 3, 1).to(dev)
    inh, head = split_parameters(model)
    pen = make_penalty("l2_sp", inh, head, alpha=0.1, beta=0.01).to(dev)
    x = torch.randn(64, 1, 16, 16, device=dev)
    y = (x.mean(dim=(1, 2, 3)) > 0).long().to(dev)
    hist = train_steps(model, pen, x, y, steps=100, batch_size=32, lr=0.05, generator=torch.Generator().manual_seed(0),
                       log_every=0)
    first, last = sum(hist.loss[:10]) / 10, sum(hist.loss[-10:]) / 10
    print(f"training on {dev}: loss {first:.3f} -> {last:.3f}", flush=True)
    return {"first": first, "last": last}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    summary = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    print(f"device: {summary['device']}, torch {summary['torch']}", flush=True)
    summary["penalties"] = check_penalties(dev)
    summary["prox"] = check_prox(dev)
    summary["fisher"] = check_fisher(dev)
    summary["training"] = check_training(dev)
    ok = (
        all(v < 1e-4 for v in summary["penalties"].values())
        and all(v < 1e-12 for v in summary["prox"].values())
        and all(v < 1e-9 for v in summary["fisher"].values())
        and summary["training"]["last"] < summary["training"]["first"]
    )
    summary["ok"] = ok
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
