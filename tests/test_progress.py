"""Progress of long steps (spbench.progress): a log line per tenth with the time left, and on a
terminal a bar redrawn in place with the log lines above it; the fine-tune, the Fisher estimate
and a task's decoding report through it."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from spbench.progress import Progress, draws_bar

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"(\d+)/(\d+) (\w+) \((\d+)%\), [\d.]+ s, about (\d+|nan) s left")


def progress_lines(caplog, what: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(4))) for r in caplog.records
            if r.getMessage().startswith(what) and (m := LINE.search(r.getMessage()))]


def test_a_line_per_tenth_with_the_time_left(caplog, monkeypatch):
    monkeypatch.setenv("SPBENCH_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="spbench"):
        with Progress(200, "work", unit="images") as bar:
            for _ in range(100):
                bar.update(2, loss=0.5)
    lines = progress_lines(caplog, "work")
    assert lines == [(20 * k, 10 * k) for k in range(1, 11)]
    assert all("loss 0.5" in r.getMessage() for r in caplog.records if r.getMessage().startswith("work"))


def test_uneven_pieces_and_a_resumed_start(caplog, monkeypatch):
    """Pieces that jump several tenths log once per jump; work done before a resume counts in
    the position, and nothing is logged for it."""
    monkeypatch.setenv("SPBENCH_PROGRESS", "log")
    with caplog.at_level(logging.INFO, logger="spbench"):
        with Progress(10, "resumed", unit="steps", start=4) as bar:
            bar.update(3)
            bar.update(3)
    assert progress_lines(caplog, "resumed") == [(7, 70), (10, 100)]


def test_no_bar_off_a_terminal(monkeypatch):
    monkeypatch.delenv("SPBENCH_PROGRESS", raising=False)
    stream = io.StringIO()
    assert not draws_bar(stream)
    with Progress(5, "quiet", stream=stream) as bar:
        bar.update(5)
    assert stream.getvalue() == ""


def test_the_environment_chooses(monkeypatch):
    monkeypatch.setenv("SPBENCH_PROGRESS", "bar")
    assert draws_bar(io.StringIO())
    monkeypatch.setenv("SPBENCH_PROGRESS", "log")
    assert not draws_bar(sys.stderr)
    monkeypatch.setenv("SPBENCH_PROGRESS", "yes")
    with pytest.raises(ValueError, match="SPBENCH_PROGRESS"):
        draws_bar()


CHILD = """
import logging, sys, time
from spbench.progress import Progress
logging.basicConfig(level=logging.INFO, format="LOG %(message)s", handlers=[logging.StreamHandler()])
with Progress(40, "bar test", unit="steps") as bar:
    for i in range(40):
        time.sleep(0.04)  # the bar redraws at most every 0.5 s
        bar.update(1, loss=1.0)
        if i == 20:
            logging.getLogger("spbench.x").info("a line in the middle")
print("DONE", file=sys.stderr)
"""


def run_on_a_terminal(argv: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    """Run ``argv`` with stderr and stdout on a pseudo-terminal; what the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-4000:]
    return b"".join(chunks).decode(errors="replace")


def test_a_bar_on_a_terminal_with_the_log_lines_above_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("SPBENCH_PROGRESS", None)
    out = run_on_a_terminal([sys.executable, "-c", CHILD], tmp_path, env, timeout=120)
    assert "\r" in out and re.search(r"bar test: +\d+%\|", out), out  # redrawn in place
    assert "LOG a line in the middle" in out and "LOG bar test: 40/40 steps (100%)" in out
    # each log line starts on a line of its own, not glued to the end of a bar
    for line in re.split(r"[\r\n]+", out):
        if "LOG" in line:
            assert line.lstrip().startswith("LOG"), repr(line)
    assert "DONE" in out


def test_train_steps_reports_its_progress(caplog, monkeypatch):
    from spbench.methods import MethodContext, make_method
    from spbench.models import build_model, split_parameters
    from spbench.train import train_steps

    monkeypatch.setenv("SPBENCH_PROGRESS", "log")
    torch.manual_seed(0)
    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    method = make_method("l2", MethodContext(model, inherited, head), alpha=0.01, beta=0.01)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 3, (16,))
    with caplog.at_level(logging.INFO, logger="spbench"):
        train_steps(model, method, x, y, steps=20, batch_size=8, lr=0.01, generator=torch.Generator().manual_seed(0),
                    log_every=0, progress="fine-tune test")
    assert progress_lines(caplog, "fine-tune test") == [(2 * k, 10 * k) for k in range(1, 11)]


def test_fisher_reports_its_progress(caplog, monkeypatch):
    from spbench.fisher import estimate_fisher
    from spbench.models import build_model

    monkeypatch.setenv("SPBENCH_PROGRESS", "log")
    torch.manual_seed(0)
    model = build_model("demo_resnet", 3, 1)
    with caplog.at_level(logging.INFO, logger="spbench"):
        estimate_fisher(model, torch.randn(20, 1, 16, 16), [n for n, _ in model.named_parameters()], batch_size=4)
    assert progress_lines(caplog, "Fisher") == [(4 * k, 20 * k) for k in range(1, 6)]


@pytest.mark.e2e
def test_snakemake_on_a_terminal_shows_the_bars_and_its_own_progress(tmp_path):
    """`snakemake` on a terminal: the jobs draw their bars, Snakemake's "n of m steps" lines stay
    whole lines, and each job's log file holds its tenths."""
    import shutil

    shutil.copy(REPO / "config" / "tiny.yaml", tmp_path / "tiny.yaml")
    env = dict(os.environ)
    env.pop("SPBENCH_PROGRESS", None)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    out = run_on_a_terminal([snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                             "tiny.yaml", "--cores", "2", "results/sources/digits-src/fisher.pt"], tmp_path, env)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)  # without Snakemake's colours
    assert re.search(r"pretrain demo_resnet: +\d+%\|", plain), plain[-3000:]
    done = [line for line in re.split(r"[\r\n]+", plain) if re.search(r"\d+ of \d+ steps \(\d+%\) done", line)]
    assert done and all(re.match(r"\s*\d+ of \d+ steps", line) for line in done), done
    assert done[-1].strip().endswith("(100%) done")
    fisher_log = (tmp_path / "logs" / "fisher" / "digits-src.log").read_text()
    assert "Fisher: 64/64 images (100%)" in fisher_log
    source_log = (tmp_path / "logs" / "source" / "digits-src.log").read_text()
    assert re.search(r"pretrain demo_resnet: \d+/\d+ steps \(100%\)", source_log)
