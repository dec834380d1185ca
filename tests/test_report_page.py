"""The report on one self-contained page (reports/report.html): every table and figure with
its caption, nothing loaded from elsewhere; rendered by headless Chromium, with a screenshot."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from spbench import reports
from spbench.results import read_parquet

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    runs = read_parquet(FIXTURES / "runs_small.parquet")
    reports.write_reports(runs, out, fig1_target="digits-mod3-k10")
    return out


def test_one_page_holds_every_table_and_figure(page_dir):
    text = (page_dir / "report.html").read_text()
    tables = sorted(p.stem for p in page_dir.glob("*.md"))
    figures = sorted(p.stem for p in page_dir.glob("fig*.png"))
    assert tables and figures
    for name in tables:
        assert f'<section id="{name}">' in text
        assert (page_dir / f"{name}.html").read_text().strip() in text  # the table with its caption
    for name in figures:
        assert f'<figure id="{name}"><img src="data:image/png;base64,' in text
        assert reports.FIGURE_CAPTIONS[name] in text
    # self-contained: no resource from a file or the network
    assert not re.search(r'(src|href)="(?!data:|#)', text)


@pytest.mark.cluster
def test_page_renders_in_headless_chromium(page_dir, tmp_path):
    from test_mlflow_server import chromium, headless

    browser = chromium()
    url = (page_dir / "report.html").as_uri()
    with tempfile.TemporaryDirectory() as profile:
        dom = headless(browser, profile, "--virtual-time-budget=5000", "--dump-dom", url)
    assert "Table 2." in dom.stdout and "Fig. 2." in dom.stdout, dom.stderr[-2000:]
    shots = Path(os.environ.get("SPBENCH_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        headless(browser, profile, "--virtual-time-budget=5000", f"--screenshot={shots / 'report.png'}", url)
    png = (shots / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a rendered page, not a blank one
