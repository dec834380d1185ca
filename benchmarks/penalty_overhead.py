#!/usr/bin/env python
"""Cost of the penalties in one SGD-momentum training step, measured side by side.

For every penalty in ``spbench.penalties.PENALTIES`` (smoothed variant; the non-smooth ones
also with ``variant='prox'`` as separate rows; where ``gl_sp_fisher/prox`` runs its native CPU
kernel, see ``spbench.penalties.NATIVE``, also ``gl_sp_fisher/prox-torch``, the same proximal map
by the torch operations), for ``none``, and for a BASELINE — the loss-term
L2-SP found in public transfer-learning code (a Python loop over the model's parameters
summing ``(w - w0).pow(2).sum()`` with ``w0`` in a plain dict, times α/2, plus β/2‖head‖²,
added to the loss and differentiated by autograd) — this times one full step:

    zero_grad (untimed) | forward, cross-entropy, [baseline term], backward,
                          penalty.add_grad_(), opt.step(), penalty.prox_(lr)

All variants share one model and one optimizer and are measured in one process, interleaved:
in every repeat each timed round runs one step of every variant (the order rotates between
repeats), so drift and background load hit all variants alike. Each variant is warmed up
first. On CUDA the device is synchronised before and after every timed region.

Reported per row: median step time (median over repeats of the per-repeat median), overhead
vs ``none`` (median over repeats of the paired per-repeat difference), the penalty alone
(``add_grad_()`` timed alone right after each step, plus for the proximal rows the median of
``prox_()`` timed within each timed step, on the weights the optimizer step has just moved;
for the baseline: building its loss term and back-propagating through it alone), peak memory
of a step above what was allocated before it, the persistent state the penalty keeps
(``w0``, Fisher), and the number of penalised elements (a FLOP-free size of the work).

Usage:  python benchmarks/penalty_overhead.py [--quick] [--json] [--device cuda] ...
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import re
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spbench import penalties
from spbench.models import build_model, split_parameters
from spbench.pipeline import device_name
from spbench.penalties import PENALTIES, make_penalty

NONE = "none"
BASELINE = "baseline_loss_l2_sp"
FISHER_NOTE = "Fisher diagonal for the *_fisher penalties: random positive tensors (uniform in [0.1, 1.1)) of the parameters' shapes"


# -- the baseline: the loss-term L2-SP of public transfer-learning code ---------------------------
class LossTermL2SP:
    """α/2 Σ_{w∈S} ‖w − w0‖² + β/2 Σ_{w∈S̄} ‖w‖², as commonly written: a Python loop over
    ``model.named_parameters()``, the starting point kept in a plain dict, the result added to
    the loss and differentiated by autograd."""

    def __init__(self, model: nn.Module, inherited: list[str], head: list[str], alpha: float, beta: float):
        self.model, self.alpha, self.beta = model, alpha, beta
        params = dict(model.named_parameters())
        self.w0 = {n: params[n].detach().clone() for n in inherited}
        self.head = set(head)

    def __call__(self) -> torch.Tensor:
        sp, l2 = 0.0, 0.0
        for name, p in self.model.named_parameters():
            if name in self.w0:
                sp = sp + (p - self.w0[name]).pow(2).sum()
            elif name in self.head:
                l2 = l2 + p.pow(2).sum()
        return self.alpha / 2 * sp + self.beta / 2 * l2

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w0.values())

    def penalised_elements(self) -> int:
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n in (*self.w0, *self.head))


# -- memory ---------------------------------------------------------------------------------------
class CpuPeak:
    """Peak resident memory of a code region above the RSS at its start (CPU only).

    Preferred: Linux's VmHWM (peak RSS, exact), reset before the region by writing 5 to
    /proc/self/clear_refs. Else psutil: RSS sampled by a thread every 0.5 ms (may miss short
    peaks). Else ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` growth (the process peak
    cannot be reset: a lower bound, 0 once an earlier region went higher). Before each region
    glibc's free heap is returned to the system (``malloc_trim``), so that memory kept by the
    allocator from earlier steps does not hide new allocations.
    """

    def __init__(self):
        self._libc = None
        with contextlib.suppress(OSError, AttributeError):
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim  # noqa: B018
        self.method = self._pick()

    def _pick(self) -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status("VmHWM")
            return "vmhwm"
        except (OSError, AttributeError, ValueError):
            pass
        try:
            import psutil  # noqa: F401

            return "psutil"
        except ImportError:
            return "ru_maxrss"

    def describe(self) -> str:
        trim = " (malloc_trim(0) before the step)" if self._libc is not None else ""
        return {
            "vmhwm": "CPU: peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS at the step's start" + trim,
            "psutil": "CPU: peak RSS sampled by psutil every 0.5 ms minus RSS at the step's start" + trim + " (may miss short peaks)",
            "ru_maxrss": "CPU: growth of getrusage(RUSAGE_SELF).ru_maxrss over the step" + trim + " (lower bound: the process peak is never reset)",
        }[self.method]

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        if m is None:
            raise ValueError(key)
        return int(m.group(1)) * 1024

    def _rss(self) -> int:
        if self.method == "vmhwm":
            return self._status("VmRSS")
        import psutil

        return psutil.Process().memory_info().rss

    def measure(self, fn: Callable[[], None]) -> int:
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.method == "vmhwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            start = self._rss()
            fn()
            return self._status("VmHWM") - start
        if self.method == "psutil":
            import threading

            import psutil

            proc, peak, done = psutil.Process(), [0], threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.0005)

            start = proc.memory_info().rss
            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                fn()
            finally:
                done.set()
                thread.join()
            return max(peak[0], proc.memory_info().rss) - start
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # kB on Linux


# -- helpers --------------------------------------------------------------------------------------
TORCH_OPS = "gl_sp_fisher/prox-torch"


class TorchOps(nn.Module):
    """A proximal penalty whose ``prox_`` runs on the torch operations, not the native kernel
    (spbench.penalties.NATIVE = 'never' for the call)."""

    def __init__(self, penalty: nn.Module):
        super().__init__()
        self.penalty, self.name, self.variant = penalty, penalty.name, penalty.variant

    def add_grad_(self) -> None:
        self.penalty.add_grad_()

    def prox_(self, lr: float) -> None:
        saved, penalties.NATIVE = penalties.NATIVE, "never"
        try:
            self.penalty.prox_(lr)
        finally:
            penalties.NATIVE = saved

    def describe(self) -> dict:
        return self.penalty.describe()


def penalty_state_bytes(pen: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in pen.buffers())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="architecture (default resnet50; demo_resnet with --quick)")
    ap.add_argument("--image-size", type=int, default=None, help="input height = width (default 224; 16 with --quick)")
    ap.add_argument("--channels", type=int, default=None, help="input channels (default 3; 1 with --quick)")
    ap.add_argument("--classes", type=int, default=100, help="classes of the head (default 100)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 4 on CPU, 32 on CUDA, 8 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant and repeat (default 2; 1 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing (default 1)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: forward and loss under autocast, parameters stay float32")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 with --device cpu, as several threads spin against each other "
                         "on a busy machine; torch's default with --device cuda)")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="demo_resnet on 16x16x1 images, few steps (smoke test)")
    args = ap.parse_args(argv)
    q = args.quick
    args.arch = args.arch or ("demo_resnet" if q else "resnet50")
    args.image_size = args.image_size or (16 if q else 224)
    args.channels = args.channels or (1 if q else 3)
    args.batch = args.batch or (8 if q else 32 if args.device == "cuda" else 4)
    args.steps = args.steps or (1 if q else 2)
    args.repeats = args.repeats or (2 if q else 3)
    if min(args.batch, args.steps, args.repeats) < 1 or args.warmup < 0:
        ap.error("--batch, --steps, --repeats must be >= 1 and --warmup >= 0")
    return args


# -- the benchmark --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    model = build_model(args.arch, args.classes, args.channels).to(device)
    model.train()
    inherited, head = split_parameters(model)
    gen = torch.Generator().manual_seed(1)
    fisher = {n: (torch.rand(p.shape, generator=gen) + 0.1).to(device) for n, p in inherited.items()}
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)

    # Variants: name -> (penalty used by add_grad_/prox_, baseline loss term or None).
    variants: dict[str, tuple[nn.Module, LossTermL2SP | None]] = {}
    for name in PENALTIES:
        ab = {"alpha": 0.0, "beta": 0.0} if name == NONE else {"alpha": args.alpha, "beta": args.beta}
        variants[name] = (make_penalty(name, inherited, head, fisher=fisher, variant="smooth", **ab).to(device), None)
        prox = make_penalty(name, inherited, head, fisher=fisher, variant="prox", **ab).to(device)
        if getattr(prox, "variant", None) == "prox":
            variants[f"{name}/prox"] = (prox, None)
        else:
            del prox
    # gl_sp_fisher's proximal map by its native kernel (where spbench.penalties.NATIVE selects it)
    # and, side by side, by the torch operations
    fisher_prox = variants.get("gl_sp_fisher/prox", (None,))[0]
    if fisher_prox is not None:
        t0 = time.perf_counter()
        if fisher_prox.runs_native(args.lr):
            log(f"gl_sp_fisher/prox: native kernel (spbench.penalties.NATIVE={penalties.NATIVE!r}), "
                f"built or loaded in {time.perf_counter() - t0:.1f} s; torch operations as {TORCH_OPS}")
            variants[TORCH_OPS] = (TorchOps(fisher_prox), None)
    none_pen = variants[NONE][0]
    variants[BASELINE] = (none_pen, LossTermL2SP(model, list(inherited), list(head), args.alpha, args.beta))
    names = list(variants)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bfloat16" else contextlib.nullcontext
    )

    def step(name: str, prox_times: list | None = None) -> None:
        pen, term = variants[name]
        with autocast():
            loss = F.cross_entropy(model(x), y)
        if term is not None:
            loss = loss + term()
        loss.backward()
        pen.add_grad_()
        opt.step()
        if prox_times is None:
            pen.prox_(args.lr)
            return
        # The proximal map's share of the step, timed where it runs (on the weights the
        # optimizer step has just moved): CUDA events, so that no synchronisation is added.
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pen.prox_(args.lr)
            end.record()
            prox_times.append((start, end))
        else:
            t0 = time.perf_counter()
            pen.prox_(args.lr)
            prox_times.append(time.perf_counter() - t0)

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def baseline_alone() -> None:
        variants[BASELINE][1]().backward()

    step_s = {n: [[] for _ in range(args.repeats)] for n in names}
    add_grad_s = {n: [] for n in names}
    prox_s = {n: [] for n in names}
    peak_cuda = {n: 0 for n in names}

    log(f"{args.arch} {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, {args.dtype}, "
        f"{device_name(device)}; {len(names)} variants")
    t_start = time.perf_counter()
    for _ in range(args.warmup):
        for n in names:
            opt.zero_grad(set_to_none=True)
            timed(lambda: step(n))
    log(f"warm-up done in {time.perf_counter() - t_start:.1f} s")

    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for _ in range(args.steps):
            for n in order:
                opt.zero_grad(set_to_none=True)
                if cuda:
                    sync()
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                pen, term = variants[n]
                is_prox = getattr(pen, "variant", None) == "prox"
                step_s[n][r].append(timed(lambda: step(n, prox_s[n] if is_prox else None)))
                if cuda:
                    peak_cuda[n] = max(peak_cuda[n], torch.cuda.max_memory_allocated(device) - base)
                # The penalty alone, right after the step (the gradients exist), outside the step's timing.
                if term is not None:
                    add_grad_s[n].append(timed(baseline_alone))
                else:
                    add_grad_s[n].append(timed(pen.add_grad_))
        log(f"repeat {r + 1}/{args.repeats} done at {time.perf_counter() - t_start:.1f} s")

    memory = None
    if args.no_memory:
        mem_method = "not measured (--no-memory)"
    elif cuda:
        mem_method = "CUDA: torch.cuda.max_memory_allocated during the step minus memory_allocated at its start (max over timed steps)"
        memory = peak_cuda
    else:
        cpu_peak = CpuPeak()
        mem_method = cpu_peak.describe() + "; one step per variant in a separate pass after the timing"
        memory = {}
        gc.collect()
        for n in names:
            opt.zero_grad(set_to_none=True)
            memory[n] = cpu_peak.measure(lambda: step(n))
        log(f"memory pass done at {time.perf_counter() - t_start:.1f} s")

    # -- summary ----------------------------------------------------------------------------------
    med = statistics.median
    if cuda:  # the events of the in-step prox_ timings, all complete by now
        prox_s = {n: [a.elapsed_time(b) / 1e3 for a, b in v] for n, v in prox_s.items()}
    rep_med = {n: [med(s) for s in step_s[n]] for n in names}
    none_rep = rep_med[NONE]
    none_ms = med(none_rep) * 1e3
    rows = []
    for n in names:
        pen, term = variants[n]
        diffs = [(a - b) * 1e3 for a, b in zip(rep_med[n], none_rep)]
        over_ms = med(diffs)
        desc = pen.describe()
        elements = term.penalised_elements() if term is not None else desc["n_inherited_elements"] + desc["n_head_elements"]
        if n == NONE:
            elements = 0
        rows.append({
            "variant": n,
            "penalty": NONE if term is not None else pen.name,
            "kind": "loss-term baseline (autograd)" if term is not None else getattr(pen, "variant", "smooth"),
            "step_ms": med(rep_med[n]) * 1e3,
            "step_ms_per_repeat": [v * 1e3 for v in rep_med[n]],
            "overhead_ms": over_ms,
            "overhead_pct": 100 * over_ms / none_ms,
            "overhead_pct_per_repeat": [100 * d / none_ms for d in diffs],
            "penalty_only_ms": (med(add_grad_s[n]) + (med(prox_s[n]) if prox_s[n] else 0.0)) * 1e3,
            "add_grad_ms": med(add_grad_s[n]) * 1e3,
            "prox_ms": med(prox_s[n]) * 1e3 if prox_s[n] else 0.0,
            "penalised_elements": elements,
            "state_bytes": term.state_bytes() if term is not None else penalty_state_bytes(pen),
            "peak_mem_delta_bytes": None if memory is None else memory[n],
        })
    by = {row["variant"]: row for row in rows}
    l2sp_over, base_over = by["l2_sp"]["overhead_ms"], by[BASELINE]["overhead_ms"]
    ratio = base_over / l2sp_over if l2sp_over > 0 else None
    pen_ratio = by[BASELINE]["penalty_only_ms"] / by["l2_sp"]["penalty_only_ms"]
    return {
        "benchmark": "penalty_overhead",
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "arch": args.arch,
        "batch": args.batch,
        "image_size": args.image_size,
        "channels": args.channels,
        "classes": args.classes,
        "dtype": args.dtype,
        "autocast": args.dtype == "bfloat16",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "alpha": args.alpha,
        "beta": args.beta,
        "lr": args.lr,
        "momentum": 0.9,
        "fisher": FISHER_NOTE,
        "memory_measure": mem_method,
        "step": "zero_grad (untimed) | forward, cross-entropy, [baseline term], backward, add_grad_(), SGD-momentum step, prox_(lr)",
        "penalty_only": "add_grad_() timed alone after a step (+ prox_(lr) timed within the step for the prox rows); "
                        "baseline: its loss term built and back-propagated alone",
        "overhead": "median over repeats of (variant - none) per-repeat median step time, in % of none's median step",
        "none_step_ms": none_ms,
        "baseline_over_l2_sp_overhead": ratio,
        "baseline_over_l2_sp_penalty_only": pen_ratio,
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }


def print_table(res: dict) -> None:
    print(f"\npenalty_overhead: {res['arch']}, {res['image_size']}x{res['image_size']}x{res['channels']}, "
          f"batch {res['batch']}, {res['classes']} classes, {res['dtype']}"
          f"{' (autocast forward, float32 parameters)' if res['autocast'] else ''}")
    print(f"device: {res['device_name']}, torch {res['torch']}")
    print(f"{res['repeats']} repeats x {res['steps']} interleaved steps per variant, {res['warmup']} warm-up step(s); "
          f"SGD momentum 0.9, lr {res['lr']}, alpha {res['alpha']}, beta {res['beta']}")
    print(res["fisher"])
    print(f"memory: {res['memory_measure']}")
    hdr = f"{'variant':<22} {'step ms':>9} {'overhead':>9} {'(range over repeats)':>21} {'penalty ms':>10} {'penalised el.':>13} {'state MB':>9} {'peak dMB':>9}"
    print()
    print(hdr)
    print("-" * len(hdr))
    for row in res["rows"]:
        lo, hi = min(row["overhead_pct_per_repeat"]), max(row["overhead_pct_per_repeat"])
        mem = "-" if row["peak_mem_delta_bytes"] is None else f"{row['peak_mem_delta_bytes'] / 2**20:9.1f}"
        print(f"{row['variant']:<22} {row['step_ms']:9.2f} {row['overhead_pct']:8.1f}% {f'[{lo:.1f}, {hi:.1f}]%':>21} "
              f"{row['penalty_only_ms']:10.3f} {row['penalised_elements']:13,d} {row['state_bytes'] / 2**20:9.1f} {mem:>9}")
    r = res["baseline_over_l2_sp_overhead"]
    print()
    print("overhead = median over repeats of the paired per-repeat difference to 'none', in % of none's median step.")
    print("penalty ms = add_grad_() alone (+ prox_() timed within the step for /prox rows); for the baseline, its loss term + backward alone.")
    print(f"{BASELINE}: sum((w - w0[name]).pow(2).sum()) over model.named_parameters(), w0 in a dict, * alpha/2, "
          f"+ beta/2 * head, added to the loss (autograd).")
    print("baseline overhead / l2_sp overhead: " + ("n/a (l2_sp overhead <= 0, within noise)" if r is None else f"{r:.2f}")
          + "  (unstable when l2_sp's overhead is within the noise: compare the ranges above)")
    print(f"baseline penalty-only / l2_sp penalty-only: {res['baseline_over_l2_sp_penalty_only']:.2f}")
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
