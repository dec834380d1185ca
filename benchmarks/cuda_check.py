"""CUDA correctness of the library: run on a machine with a GPU.

Checks, each against a CPU reference:
- every penalty on a ResNet-101 (float32 on the GPU): the foreach fast path, the per-tensor
  loop and autograd of the explicit Ω give the same gradient;
- the proximal variants give the same weights on the GPU as on the CPU;
- the exact and Monte-Carlo Fisher estimators on the demo network (float64) agree with the CPU;
- a demo fine-tune (training loop, method, evaluation) runs on the GPU and its loss falls;
- the training loop does not make the host wait for the device at every step: the count of
  synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) of a 40-step run is that of a
  10-step run, in fp32 and in fp16, on a batch tensor and on the augmented uint8 cache a job
  reads (the losses are read a batch at a time, the batch indices and the augmentation's draws
  go over without blocking, fp16's skipped-step check stays on the device);
- every method of the registry (the penalties, LwF, DELTA, BSS, Co-Tuning): a few training
  steps on the demo network in float64 (set-up pass, taps, teacher forward, its own
  parameters) give the same weights on the GPU as on the CPU.

Prints one line per check and a JSON summary; exits 1 if any check fails.

    python benchmarks/cuda_check.py [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings

import numpy as np
import torch

from spbench.augment import CachedImages
from spbench.fisher import estimate_fisher
from spbench.methods import METHODS, MethodContext, make_method
from spbench.models import build_model, split_parameters
from spbench.penalties import PENALTIES, make_penalty
from spbench.train import Precision, evaluate, train_steps


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


def _demo_fine_tune(dev):
    """The demo network with L2-SP and 64 separable images on ``dev``: model, method, x, y."""
    torch.manual_seed(4)
    model = build_model("demo_resnet", 3, 1).to(dev)
    inh, head = split_parameters(model)
    method = make_method("l2_sp", MethodContext(model, inh, head), alpha=0.1, beta=0.01).to(dev)
    x = torch.randn(64, 1, 16, 16, device=dev)
    y = (x.mean(dim=(1, 2, 3)) > 0).long().to(dev)
    return model, method, x, y


def check_training(dev) -> dict:
    model, method, x, y = _demo_fine_tune(dev)
    hist = train_steps(model, method, x, y, steps=100, batch_size=32, lr=0.05, generator=torch.Generator().manual_seed(0),
                       log_every=0)
    first, last = sum(hist.loss[:10]) / 10, sum(hist.loss[-10:]) / 10
    acc = evaluate(model, x, y)
    print(f"training on {dev}: loss {first:.3f} -> {last:.3f}, training accuracy {acc:.3f}", flush=True)
    return {"first": first, "last": last, "accuracy": acc}


def check_host_syncs(dev) -> dict:
    """The synchronising calls of a 10-step and a 40-step run, in fp32 and in fp16 (its
    gradient scaler with the fused SGD kernel, which reads the inf flag on the device), on a
    batch tensor already on the device and on a job's input: a uint8 cache read through the
    paper's augmentation (spbench.augment.CachedImages: crop, mirror, blur on the device)."""
    def syncs(steps: int, precision: Precision, data: str) -> int:
        model, method, x, y = _demo_fine_tune(dev)
        if data == "augmented":
            cache = np.random.default_rng(0).integers(0, 256, size=(len(x), 18, 18, 1), dtype=np.uint8)
            x = CachedImages(cache, np.arange(len(x)), mean=[0.5], crop=16, train=True, device=dev,
                             generator=torch.Generator().manual_seed(1), blur_p=0.5)
        torch.cuda.synchronize(dev)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_steps(model, method, x, y, steps=steps, batch_size=32, lr=0.05,
                            generator=torch.Generator().manual_seed(0), log_every=0, precision=precision)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    counts = {}
    for data in ("tensor", "augmented"):
        for name in ("fp32", "fp16"):
            short, long = syncs(10, Precision(name, "cuda"), data), syncs(40, Precision(name, "cuda"), data)
            print(f"host syncs in the training loop on {dev}, {name}, {data} input: {short} in 10 steps, "
                  f"{long} in 40 steps", flush=True)
            counts[f"{name}/{data}"] = {"steps_10": short, "steps_40": long}
    return counts


def _method_run(name: str, dev, steps: int = 5) -> list[torch.Tensor]:
    """``steps`` training steps of method ``name`` (float64, demo network, the source network a
    5-class demo model) on ``dev``; the fine-tuned model's and the method's tensors after."""
    torch.manual_seed(5)
    source = build_model("demo_resnet", 5, 1).double()
    model = build_model("demo_resnet", 3, 1).double()
    model.backbone.load_state_dict(source.backbone.state_dict())
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.arange(32) % 3
    source, model, x, y = source.to(dev).eval(), model.to(dev), x.to(dev), y.to(dev)
    inherited, head = split_parameters(model)
    cls = METHODS[name]
    fisher = {n: torch.rand(p.shape, generator=g, dtype=p.dtype).to(dev) + 0.1 for n, p in inherited.items()} \
        if cls.needs.fisher else None
    context = MethodContext(model, inherited, head, source_model=source, fisher=fisher, epsilon=0.05)
    method = make_method(name, context).to(dev)
    train_steps(model, method, x, y, steps=steps, batch_size=8, lr=0.05, generator=torch.Generator().manual_seed(7),
                log_every=0)
    return [t.detach().cpu() for t in [*model.state_dict().values(), *method.state_dict().values()]
            if t.is_floating_point()]


def check_methods(dev) -> dict:
    out = {}
    for name in sorted(METHODS):
        cpu, gpu = _method_run(name, torch.device("cpu")), _method_run(name, dev)
        err = max(float((a - b).abs().max() / (a.abs().max() + 1e-30)) for a, b in zip(cpu, gpu))
        out[name] = err
        print(f"method {name:14s} max relative difference GPU vs CPU after 5 steps (float64): {err:.2e}", flush=True)
    return out


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
    summary["host_syncs"] = check_host_syncs(dev)
    summary["methods"] = check_methods(dev)
    ok = (
        all(v < 1e-4 for v in summary["penalties"].values())
        and all(v < 1e-12 for v in summary["prox"].values())
        and all(v < 1e-9 for v in summary["fisher"].values())
        and summary["training"]["last"] < summary["training"]["first"]
        and all(c["steps_40"] == c["steps_10"] for c in summary["host_syncs"].values())
        and all(v < 1e-8 for v in summary["methods"].values())
    )
    summary["ok"] = ok
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
