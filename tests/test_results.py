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
    record.update(source="s", target="t", penalty="l2_sp", run_key="s/t/l2_sp/a0.1_b0.01/freeze0/rep0", replicate=0)
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
