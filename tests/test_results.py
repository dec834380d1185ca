"""The result schema: records and the run table."""

from __future__ import annotations

import pandas as pd
import pytest

from spbench.results import SCHEMA, SchemaError, read_parquet, read_record, records_to_frame, write_parquet, write_record


def make_record(**overrides) -> dict:
    values = {
        "string": "x",
        "double": 0.5,
        "int64": 1,
    }
    record = {f.name: values[str(f.type)] for f in SCHEMA}
    record.update(experiment="main", source="s", target="t", method="l2_sp", setting="alpha=0.1_beta=0.01_lr=0.5",
                  hparams_json='{"alpha": 0.1, "beta": 0.01}', alpha=0.1, beta=0.01, lr=0.5, evaluation="test",
                  run_key="main/s/t/l2_sp/alpha=0.1_beta=0.01_lr=0.5/freeze1/test/rep0", replicate=0)
    record.update(overrides)
    return record


def test_record_roundtrip_and_extra_fields(tmp_path):
    """A record with extra fields (the curve) is written atomically and read back whole."""
    rec = make_record(train_loss=[1.0, 0.5])
    write_record(tmp_path / "a" / "record.json", rec)
    assert read_record(tmp_path / "a" / "record.json") == rec
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["record.json"]


def test_record_missing_or_mistyped_field_is_refused(tmp_path):
    rec = make_record()
    del rec["test_accuracy"]
    with pytest.raises(SchemaError, match="test_accuracy"):
        write_record(tmp_path / "r.json", rec)
    with pytest.raises(SchemaError):
        write_record(tmp_path / "r.json", make_record(freeze="deep"))
    assert not (tmp_path / "r.json").exists()


def test_table_roundtrip_and_duplicates(tmp_path):
    """records -> frame -> Parquet -> frame keeps the schema; two records of one identity are refused."""
    recs = [make_record(replicate=i, run_key=f"k{i}", test_accuracy=i / 10) for i in range(3)]
    frame = records_to_frame(recs)
    assert list(frame.columns) == [f.name for f in SCHEMA]
    write_parquet(frame, tmp_path / "runs.parquet")
    back = read_parquet(tmp_path / "runs.parquet")
    pd.testing.assert_frame_equal(back, frame)
    with pytest.raises(SchemaError, match="identity"):
        records_to_frame(recs + [make_record(replicate=1, run_key="again")])


def test_parquet_with_other_columns_is_refused(tmp_path):
    frame = records_to_frame([make_record()]).drop(columns=["seed"])
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match="seed"):
        read_parquet(tmp_path / "bad.parquet")


def test_identity_is_the_run_path_and_alpha_beta_may_be_missing(tmp_path):
    """IDENTITY is what a run path spells (the setting text, not alpha/beta/lr); a method
    without alpha or beta stores NaN there, and the table keeps it through Parquet."""
    from spbench.config import RunSpec
    from spbench.results import IDENTITY

    assert IDENTITY == ["experiment", "source", "target", "method", "setting", "freeze", "evaluation", "replicate"]
    assert IDENTITY == list(RunSpec.WILDCARDS)
    lwf = make_record(method="lwf", setting="lambda=1.0_lr=0.5_temperature=2.0", run_key="k-lwf",
                      hparams_json='{"lambda": 1.0, "temperature": 2.0}', alpha=float("nan"), beta=float("nan"))
    other = make_record(setting="alpha=0.2_beta=0.01_lr=0.5", alpha=0.2, run_key="k-other")
    frame = records_to_frame([make_record(), lwf, other])  # three settings: three identities
    write_parquet(frame, tmp_path / "runs.parquet")
    back = read_parquet(tmp_path / "runs.parquet").set_index("method")
    assert back.loc["lwf", "alpha"] != back.loc["lwf", "alpha"] and back.loc["lwf", "beta"] != back.loc["lwf", "beta"]
    assert sorted(back.loc["l2_sp", "alpha"]) == [0.1, 0.2]


def test_code_version_names_the_commit_of_a_checkout_and_whether_it_was_changed(tmp_path):
    """git_suffix: a tracked file of a checkout gives +g<its commit>, .dirty once a tracked
    file differs from it; an untracked file (an installed copy inside a checkout), or a file
    outside any checkout, gives nothing."""
    import subprocess

    from spbench import __version__, code_version, git_suffix

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    outside = tmp_path / "plain" / "module.py"
    outside.parent.mkdir()
    outside.write_text("x = 1\n")
    assert git_suffix(outside) == ""
    repo = tmp_path / "checkout"
    (repo / "pkg").mkdir(parents=True)
    module = repo / "pkg" / "module.py"
    module.write_text("x = 1\n")
    git("init", "-q")
    git("add", "pkg/module.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD")
    suffix = git_suffix(module)
    assert suffix.startswith("+g") and commit.startswith(suffix[2:]) and len(suffix) == 2 + 12
    (repo / "pkg" / "installed.py").write_text("y = 2\n")  # untracked: not the checkout's code
    assert git_suffix(repo / "pkg" / "installed.py") == ""
    assert git_suffix(module) == suffix  # untracked files do not make it dirty
    module.write_text("x = 2\n")
    assert git_suffix(module) == suffix + ".dirty"
    assert code_version().startswith(__version__)
