"""The result schema, defined once: one row per fine-tune run.

A fine-tune job writes one JSON record (the source of truth for that run); the aggregate
step reads all records into ``results/runs.parquet`` with exactly the columns of
:data:`SCHEMA`. Reports are pure functions of that table.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .config import RunSpec

if TYPE_CHECKING:  # pandas is imported where a frame is made: a fine-tune job writes records only
    import pandas as pd

__all__ = [
    "SCHEMA",
    "IDENTITY",
    "R2_SCHEMA",
    "OVERHEAD_SCHEMA",
    "SchemaError",
    "write_json_atomic",
    "write_record",
    "read_record",
    "records_to_frame",
    "write_parquet",
    "read_parquet",
    "aggregate_records",
]

log = logging.getLogger(__name__)

#: Columns of ``runs.parquet`` and the fields of every record, with their Arrow types.
#: The record may carry more (the train-loss curve, the resolved config as a dict);
#: the table keeps the config as JSON text and drops the curve.
SCHEMA = pa.schema(
    [
        # identity of the run (its output path spells these)
        ("run_key", pa.string()),
        ("experiment", pa.string()),  # main | select | alpha_beta | freeze (spbench.config.EXPERIMENTS)
        ("source", pa.string()),
        ("target", pa.string()),
        ("method", pa.string()),  # spbench.methods.METHODS (the seven penalties among them)
        ("setting", pa.string()),  # canonical text of its hyper-parameters and lr (spbench.config.format_setting)
        ("freeze", pa.int64()),
        ("evaluation", pa.string()),  # "test": train on the training set, score on the test set;
        # "val{f}": train on the training set less fold f, score on fold f (model selection)
        ("replicate", pa.int64()),
        ("seed", pa.int64()),
        # the method's hyper-parameters: all as JSON, the common ones typed (NaN where the method has none)
        ("hparams_json", pa.string()),
        ("alpha", pa.float64()),
        ("beta", pa.float64()),
        # how the method and training were set up
        ("arch", pa.string()),
        ("sp_scope", pa.string()),
        ("penalty_variant", pa.string()),  # smooth | prox for l1_sp, gl_sp, gl_sp_fisher; "" otherwise
        ("epsilon", pa.float64()),  # smoothing in effect (0 when exact)
        ("bn_mode", pa.string()),
        ("precision", pa.string()),  # fp32 | bf16 | fp16 (autocast; float32 master weights)
        ("fisher_estimator", pa.string()),
        ("fisher_normalize", pa.string()),  # none | mean (over the whole backbone, before restriction to S)
        ("fisher_samples", pa.int64()),  # labels sampled per image by the mc estimator (0: exact, or no Fisher)
        ("fisher_m", pa.int64()),  # source images the Fisher was estimated on (0: no Fisher)
        ("steps", pa.int64()),
        ("batch_size", pa.int64()),
        ("lr", pa.float64()),
        ("n_train", pa.int64()),
        ("n_test", pa.int64()),
        ("num_classes", pa.int64()),
        ("n_inherited_tensors", pa.int64()),
        ("n_head_tensors", pa.int64()),
        ("n_method_parameters", pa.int64()),  # trainable parameters of the method's own (e.g. LwF's source head)
        ("retention_head", pa.string()),  # Table 3's head: "original" source head, or the method's trained copy
        # outcomes
        ("test_accuracy", pa.float64()),  # accuracy on the evaluation split: the test set, or fold f for val{f}
        ("final_train_loss", pa.float64()),
        ("source_accuracy", pa.float64()),
        ("source_accuracy_pretrained", pa.float64()),
        ("source_accuracy_drop", pa.float64()),
        # cost
        ("device", pa.string()),
        ("wall_seconds", pa.float64()),
        ("images_per_second", pa.float64()),
        # provenance
        ("spbench_version", pa.string()),  # spbench.code_version(): with the commit when run from a checkout
        ("torch_version", pa.string()),
        ("config_json", pa.string()),
    ]
)

#: The columns that identify a run (the fields of its path, :attr:`spbench.config.RunSpec.PATTERN`);
#: no two rows of a valid table share them.
IDENTITY = list(RunSpec.WILDCARDS)

#: Fig. 4's table (results/activations.parquet): one row per unit (output channel) of each
#: layer, the R² of its fine-tuned activation regressed on its pretrained activation.
R2_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("target", pa.string()),
        ("method", pa.string()),
        ("setting", pa.string()),
        ("replicate", pa.int64()),
        ("layer", pa.string()),  # module name, e.g. backbone.stage2.conv1
        ("layer_index", pa.int64()),  # position in forward order, from 1
        ("unit", pa.int64()),
        ("r2", pa.float64()),
    ]
)

#: §4.4.1's table (results/overhead.parquet): the cost of one training step with a penalty.
OVERHEAD_SCHEMA = pa.schema(
    [
        ("arch", pa.string()),
        ("penalty", pa.string()),
        ("batch_size", pa.int64()),
        ("image_size", pa.int64()),
        ("step_flops", pa.float64()),  # forward + backward + optimizer, counted by torch.utils.flop_counter
        ("penalty_flops", pa.float64()),  # elementwise operations of add_grad_, counted analytically
        ("flops_ratio", pa.float64()),  # penalty_flops / step_flops
        ("step_seconds", pa.float64()),  # measured, median
        ("penalty_seconds", pa.float64()),  # add_grad_ alone, measured, median
        ("device", pa.string()),
    ]
)


class SchemaError(ValueError):
    """A record or table does not match :data:`SCHEMA`."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON so that ``path`` either holds all of it or does not exist."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_record(record: Mapping[str, Any]) -> None:
    missing = [f.name for f in SCHEMA if f.name not in record]
    if missing:
        raise SchemaError(f"record lacks the fields {missing}")
    try:
        pa.Table.from_pylist([{f.name: record[f.name] for f in SCHEMA}], schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SchemaError(f"record does not fit the result schema: {err}") from err


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Check ``record`` against the schema and write it atomically as JSON."""
    _check_record(record)
    write_json_atomic(path, dict(record))


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as fh:
        record = json.load(fh)
    try:
        _check_record(record)
    except SchemaError as err:
        raise SchemaError(f"{path}: {err}") from None
    return record


def records_to_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record, exactly the schema's columns; duplicate identities are refused. A
    record with ``variants`` (a validation run that scored several post-hoc values of its
    method from one training, e.g. WiSE-FT's a) gives one row per variant instead: the
    record's fields, with the variant's setting, hyper-parameters and accuracies, and the run
    key that setting spells."""
    import dataclasses

    from .config import parse_setting

    rows = []
    for r in records:
        row = {f.name: r[f.name] for f in SCHEMA}
        variants = r.get("variants") or []
        if not variants:
            rows.append(row)
            continue
        spec = RunSpec.from_key(r["run_key"])
        for v in variants:
            key = dataclasses.replace(spec, setting=parse_setting(v["setting"])).key
            rows.append({**row, **{k: v[k] for k in ("setting", "hparams_json", "test_accuracy", "source_accuracy",
                                                     "source_accuracy_drop")}, "run_key": key})
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    frame = table.to_pandas()
    dup = frame.duplicated(IDENTITY, keep=False)
    if dup.any():
        keys = sorted(frame.loc[dup, "run_key"].unique())
        raise SchemaError(f"several records share one run identity: {keys[:5]}")
    return frame.sort_values(IDENTITY, kind="stable").reset_index(drop=True)


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the run table atomically, typed by :data:`SCHEMA`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame[[f.name for f in SCHEMA]], schema=SCHEMA, preserve_index=False)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """Read a run table, refusing one whose columns differ from :data:`SCHEMA`."""
    table = pq.read_table(path)
    names = [f.name for f in SCHEMA]
    if table.schema.names != names:
        missing = sorted(set(names) - set(table.schema.names))
        extra = sorted(set(table.schema.names) - set(names))
        raise SchemaError(f"{path}: columns differ from the result schema (missing {missing}, extra {extra})")
    return table.cast(SCHEMA).to_pandas()


def aggregate_records(record_paths, out_path) -> int:
    """Read every run record and write the run table (Parquet); returns the row count."""
    frame = records_to_frame(read_record(p) for p in record_paths)
    write_parquet(frame, out_path)
    log.info("%d runs -> %s", len(frame), out_path)
    return len(frame)
