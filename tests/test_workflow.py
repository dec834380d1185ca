"""End to end: the real `snakemake` CLI runs the whole DAG on config/tiny.yaml in a temporary
directory; the Parquet, the MLflow runs and the reports are checked, then a rerun of one job
is checked to reproduce its record without duplicating its MLflow run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spbench import code_version
from spbench.results import SCHEMA, read_parquet, read_record

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
#: Fields that measure cost, and when the run trained: they differ between two executions of the same run.
COST_FIELDS = {"wall_seconds", "images_per_second", "started_at", "ended_at"}

pytestmark = pytest.mark.e2e


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def finished_workflow(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("wf")
    shutil.copy(REPO / "config" / "tiny.yaml", workdir / "tiny.yaml")
    snakemake(workdir, "--configfile", "tiny.yaml", "--cores", "2")
    return workdir


def tiny_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def expected_runs() -> int:
    from spbench.config import candidates, expand_runs, validate_config

    config = validate_config(tiny_config())
    # the count does not depend on which candidate selection picks
    return len(expand_runs(config, lambda s, t, m: candidates(config, m)[0]))


def test_parquet_holds_every_run(finished_workflow):
    """runs.parquet has the schema's columns and one row per grid point, each matching its record;
    a run's folder is its RunSpec.key."""
    from spbench.config import RunSpec, format_setting, parse_setting

    runs = read_parquet(finished_workflow / "results" / "runs.parquet")
    assert list(runs.columns) == [f.name for f in SCHEMA]
    assert len(runs) == expected_runs()
    assert set(runs["method"]) == set(tiny_config()["grid"]["methods"])
    assert set(runs["experiment"]) == {"main", "select", "alpha_beta", "freeze"}
    assert set(runs.loc[runs["experiment"] == "select", "evaluation"]) == {"val0"}
    # the test-set runs of a selected method use the setting its selection file names
    selections = list((finished_workflow / "results" / "selection").rglob("*.json"))
    assert selections
    for path in selections:
        chosen = json.loads(path.read_text())
        assert path.stem == chosen["method"] and format_setting(chosen["selected"]) == chosen["setting"]
        main = runs[(runs["experiment"] == "main") & (runs["method"] == chosen["method"]) & (runs["target"] == chosen["target"])]
        assert len(main) == tiny_config()["grid"]["replicates"]
        assert set(main["setting"]) == {chosen["setting"]}
        assert set(main["alpha"]) == {chosen["selected"]["alpha"]}
        val = runs[(runs["experiment"] == "select") & (runs["method"] == chosen["method"])]
        best = val.sort_values(["test_accuracy", "alpha", "beta", "lr"], ascending=[False, True, True, True]).iloc[0]
        assert chosen["selected"]["alpha"] == best["alpha"] and chosen["setting"] == best["setting"]
    assert runs["test_accuracy"].between(0, 1).all()
    assert runs["run_key"].is_unique
    assert set(runs["spbench_version"]) == {code_version()}  # the code that ran, with its commit in a checkout
    for row in runs.itertuples():
        record = read_record(finished_workflow / "results" / "runs" / row.run_key / "record.json")
        assert record["test_accuracy"] == row.test_accuracy
        assert record["seed"] == row.seed
        assert len(record["train_loss"]) == row.steps
        assert json.loads(record["config_json"])["run"]["key"] == row.run_key
        setting = parse_setting(row.setting)
        spec = RunSpec(row.source, row.target, row.method, setting, row.freeze, row.replicate,
                       evaluation=row.evaluation, experiment=row.experiment)
        assert row.run_key == spec.key and spec.seed == row.seed and row.lr == setting["lr"]
        hparams = json.loads(row.hparams_json)
        assert hparams == spec.hparams
        for name in ("alpha", "beta"):  # typed copies of the common ones, NaN where the method has none
            value = getattr(row, name)
            assert value == hparams[name] if name in hparams else value != value, (row.run_key, name)


def test_mlflow_has_one_run_per_record(finished_workflow):
    """Every fine-tune is an MLflow run with its params, curve, final metrics and tags."""
    from mlflow.tracking import MlflowClient

    runs = read_parquet(finished_workflow / "results" / "runs.parquet")
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_workflow / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(tiny_config()["tracking"]["experiment"])
    assert exp is not None
    tracked = client.search_runs([exp.experiment_id], max_results=1000)
    by_key = {r.data.tags["spbench.run_key"]: r for r in tracked}
    assert len(tracked) == len(runs) == len(by_key)
    for row in runs.itertuples():
        run = by_key[row.run_key]
        if run.info.status != "FINISHED":  # what the jobs said about MLflow, to tell why
            said = [line for log in (finished_workflow / "logs").rglob("*.log") for line in log.read_text().splitlines()
                    if "MLflow" in line or "mlflow" in line]
            pytest.fail(f"run {row.run_key} is {run.info.status}; the jobs' logs on MLflow:\n" + "\n".join(said[-40:]))
        assert run.data.metrics["test_accuracy"] == pytest.approx(row.test_accuracy)
        assert run.data.metrics["source_accuracy_drop"] == pytest.approx(row.source_accuracy_drop)
        assert run.data.tags["method"] == row.method
        assert run.data.tags["setting"] == row.setting
        assert run.data.tags["replicate"] == str(row.replicate)
        assert run.data.tags["spbench.version"] == row.spbench_version
        assert run.data.params["run.seed"] == str(row.seed)
        assert run.data.params["finetune.steps"] == str(row.steps)
        curve = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(curve) == row.steps


def test_reports_are_written(finished_workflow):
    """Every table (md, tex, html, csv) and figure (png, pdf) the config asks for comes out."""
    reports = finished_workflow / "reports"
    for table in ("table2", "table3", "selection", "overhead"):
        for ext in ("md", "tex", "html", "csv"):
            assert (reports / f"{table}.{ext}").stat().st_size > 0, f"{table}.{ext}"
    for fig in ("fig1", "fig2", "fig3", "fig4"):
        assert (reports / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (reports / f"{fig}.pdf").read_bytes()[:5] == b"%PDF-"
    table2 = (reports / "table2.md").read_text()
    for method in tiny_config()["grid"]["methods"]:
        assert method in table2


def test_rerun_reproduces_record_without_duplicate_tracking(finished_workflow):
    """A deleted record is recomputed identically (cost fields aside) and MLflow keeps one run
    per identity; afterwards the workflow has nothing left to do."""
    runs = read_parquet(finished_workflow / "results" / "runs.parquet")
    key = runs.loc[(runs["method"] == "l2_sp_fisher") & (runs["experiment"] == "main"), "run_key"].iloc[0]
    path = finished_workflow / "results" / "runs" / key / "record.json"
    before = read_record(path)
    path.unlink()
    # Snakemake does not remake a missing intermediate file on its own: ask for it.
    snakemake(finished_workflow, "--configfile", "tiny.yaml", "--cores", "2", str(path.relative_to(finished_workflow)))
    after = read_record(path)
    assert {k: v for k, v in before.items() if k not in COST_FIELDS} == {
        k: v for k, v in after.items() if k not in COST_FIELDS
    }
    test_mlflow_has_one_run_per_record(finished_workflow)
    snakemake(finished_workflow, "--configfile", "tiny.yaml", "--cores", "2")
    dry = snakemake(finished_workflow, "--configfile", "tiny.yaml", "--cores", "2", "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["grid"]["methods"].update(l2_spx={"alpha": [0.1], "beta": [0.01]}), "grid.methods.l2_spx"),
        (lambda c: c["grid"]["methods"]["l2"].update(alpha=[-1.0]), "grid.methods.l2.alpha"),
        (lambda c: c["grid"]["methods"].update(bss={"k": [1.5]}), "grid.methods.bss.k[0]"),
        (lambda c: c["grid"].update(penalties=c["grid"].pop("methods")), "grid.penalties"),
        (lambda c: c["finetune"].update(stepz=3), "finetune.stepz"),
        (lambda c: c["sources"]["digits-src"].update(weights="file", path="missing.pt"), "sources.digits-src.path"),
    ],
    ids=["unknown-method", "negative-alpha", "int-hparam", "renamed-key", "typo-key", "missing-file"],
)
def test_bad_config_fails_before_any_job(tmp_path, edit, key):
    """A bad config stops snakemake at DAG construction, naming the key; nothing is written."""
    import yaml

    config = tiny_config()
    edit(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "--configfile", "bad.yaml", "--cores", "1", check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "data").exists()


def test_long_steps_log_their_progress(finished_workflow):
    """Every fine-tune's log says how far it went, a line each tenth of its steps with the time
    left; so do the Fisher estimate and the source's pretraining."""
    steps = tiny_config()["finetune"]["steps"]
    logs = sorted((finished_workflow / "logs" / "finetune").rglob("*.log"))
    assert len(logs) == expected_runs()
    for log in logs:
        text = log.read_text()
        assert f"/{steps} steps (100%)" in text and " s left" in text, log
        assert text.count(" steps (") >= 10, log
    assert "Fisher: 64/64 images (100%)" in (finished_workflow / "logs" / "fisher" / "digits-src.log").read_text()


def test_heavy_jobs_ran_in_the_fork_server(finished_workflow):
    """Each local run started a fork server (spbench.forkserver): the journals list every heavy
    job (tasks, source, Fisher, the fine-tune groups), each exited 0; the servers are gone, and
    so are their sockets."""
    journals = list((finished_workflow / ".snakemake" / "spbench").glob("forkserver-*.log"))
    assert journals
    lines = [line for journal in journals for line in journal.read_text().splitlines()]
    started = [line for line in lines if " started: " in line]
    for name in ("finetune", "build_source", "estimate_fisher", "prepare_task"):
        assert any(f".{name}.py" in line for line in started), (name, lines)
    pids = {line.split()[2] for line in started}
    assert {line.split()[2] for line in lines if line.endswith(" exited 0")} == pids
    assert not list((finished_workflow / ".snakemake" / "spbench").glob("*.sock"))
    assert not _runs(f"-m spbench.forkserver {finished_workflow}")


def _runs(pattern: str) -> bool:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_lint_is_clean(tmp_path):
    """`snakemake --lint` finds nothing to say about the workflow."""
    shutil.copy(REPO / "config" / "tiny.yaml", tmp_path / "tiny.yaml")
    proc = snakemake(tmp_path, "--configfile", "tiny.yaml", "--lint")
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def snakemake_report(finished_workflow) -> Path:
    out = finished_workflow / "report.html"
    snakemake(finished_workflow, "--configfile", "tiny.yaml", "--report", str(out))
    return out


def test_snakemake_report_collects_tables_and_figures(snakemake_report):
    """`snakemake --report` builds one HTML file holding the figures and their captions."""
    html = snakemake_report.read_text(errors="replace")
    for caption in ("Fig. 1", "Fig. 3", "Fig. 4", "Table 2", "Model selection"):
        assert caption in html, caption
    for name in ("fig2.png", "table2.html", "selection.html"):
        assert name in html, name


#: Appended to a copy of the Snakemake report: lists every item of its menu (category, name,
#: caption, whether its content is embedded), opens the Tables category, and writes what the
#: page then shows into <pre id="spbench-probe">; then opens the whole-report item for the
#: screenshot.
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const items = [];
  for (const [category, subs] of Object.entries(categories))
    for (const paths of Object.values(subs))
      for (const path of paths)
        items.push({category, path, name: results[path].name, caption: results[path].caption || "",
                    labels: results[path].labels || {}, embedded: results[path].data_uri.startsWith("data:")});
  const landing = document.querySelector("#app").textContent;
  app.showCategory("Tables");
  setTimeout(() => {
    const tables = document.querySelector("#app").textContent;
    const whole = items.find(item => item.category === "Report");
    if (whole) app.setView({navbarMode: "resultinfo", category: "Report", resultPath: whole.path, content: "html",
                            contentPath: results[whole.path].data_uri});
    const probe = document.createElement("pre");
    probe.id = "spbench-probe";
    probe.style.display = "none";
    probe.textContent = JSON.stringify({items, landing, tables});
    document.body.appendChild(probe);
  }, 1000);
}, 1000));
</script>"""


@pytest.mark.cluster
def test_snakemake_report_renders_in_headless_chromium(snakemake_report, tmp_path):
    """The `snakemake --report` file is self-contained, opens on the workflow's description and
    lists every table and figure with its caption, rendered by headless Chromium; the screenshot
    (the whole-report item opened inside it) is kept in SPBENCH_SCREENSHOT_DIR, else the test's
    temporary folder."""
    import os
    import re
    import tempfile
    from html import unescape

    from test_mlflow_server import chromium, headless

    html = snakemake_report.read_text()
    # nothing is fetched from elsewhere: no script, style sheet or image by URL
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=[\"']?(https?:|//)", html)
    probed = tmp_path / "probed.html"
    end = html.rindex("</body>")  # the page's own; the embedded scripts hold others in strings
    probed.write_text(html[:end] + PROBE + html[end:])
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        dom = headless(browser, profile, "--virtual-time-budget=20000", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="spbench-probe"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    page = json.loads(unescape(found.group(1)))
    assert "spbench report" in page["landing"] and "digits-mod3-k5" in page["landing"]
    items = {item["name"]: item for item in page["items"]}
    written = snakemake_report.parent / "reports"
    assert set(items) == {p.name for p in written.glob("*.html")} | {p.name for p in written.glob("fig*.png")}
    words = lambda text: " ".join(re.sub(r"<[^>]+>|``", "", unescape(text)).split())  # noqa: E731
    for name, item in items.items():
        caption = words((REPO / "reports" / "captions" / f"{Path(name).stem}.rst").read_text())
        assert caption and caption in words(item["caption"]), (name, item["caption"])
        assert item["embedded"], name
        assert item["category"] == ("Report" if name == "report.html" else "Figures" if name.endswith(".png") else "Tables")
    # the Tables category, opened, lists each table by its title
    for title in ("Table 2", "Table 3", "Model selection"):
        assert title in page["tables"], title
    shots = Path(os.environ.get("SPBENCH_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        headless(browser, profile, "--virtual-time-budget=20000", f"--screenshot={shots / 'snakemake-report.png'}",
                 probed.as_uri())
    png = (shots / "snakemake-report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a rendered page, not a blank one
