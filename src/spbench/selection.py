"""Model selection's decisions from validation records: the setting chosen for a (source,
target, method), and which candidates a rung of successive halving keeps. Imports no torch:
the checkpoints that run these are light jobs on the path from the validation runs to the
test-set runs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .config import parse_setting
from .reports import rank_settings, selected_settings, selection_table
from .results import read_record, records_to_frame, write_json_atomic

__all__ = ["select_setting", "halve"]

log = logging.getLogger(__name__)


def select_setting(record_paths, out_path, rung_paths=()) -> dict:
    """Choose one method's setting for a (source, target) from its validation records, with
    the same rule as the report's selection table; write it with every candidate's score (and,
    with successive halving, each earlier rung's outcome, ``rung_paths`` from :func:`halve`)."""
    frame = records_to_frame(read_record(p) for p in record_paths)
    chosen = selected_settings(frame)
    if len(chosen) != 1:
        raise ValueError(f"expected validation runs of one (source, target, method), got {len(chosen)} groups")
    row = chosen.iloc[0]
    scores = selection_table(frame)
    result = {
        "source": row["source"],
        "target": row["target"],
        "method": row["method"],
        "setting": row["setting"],
        "selected": parse_setting(row["setting"]),
        "candidates": json.loads(scores.to_json(orient="records")),
        "rungs": [json.loads(Path(p).read_text()) for p in rung_paths],
    }
    write_json_atomic(out_path, result)
    log.info("selected for %s/%s/%s: %s", row["source"], row["target"], row["method"], result["setting"])
    return result


def halve(record_paths, out_path, *, rung: int, eta: int) -> dict:
    """One rung of successive halving for a (source, target, method): score its candidates on
    their validation records (the selection table's rule), keep the best ceil(n / eta) for
    the next rung (ties: report order, as for the selected setting); write them with every
    candidate's score. A candidate without a score is dropped; with none scored it fails."""
    frame = records_to_frame(read_record(p) for p in record_paths)
    scores = selection_table(frame)
    if scores[["source", "target", "method"]].drop_duplicates().shape[0] != 1:
        raise ValueError("expected validation runs of one (source, target, method)")
    ranking = rank_settings(scores)
    if ranking.empty:
        raise ValueError(f"rung {rung}: no candidate has a validation score")
    keep = math.ceil(len(scores) / eta)
    survivors = [{k: v for k, v in parse_setting(text).items() if k != "steps"} for text in ranking["setting"][:keep]]
    first = scores.iloc[0]
    result = {
        "source": first["source"],
        "target": first["target"],
        "method": first["method"],
        "rung": rung,
        "steps": int(frame["steps"].iloc[0]),
        "eta": eta,
        "survivors": survivors,
        "candidates": json.loads(scores.drop(columns="selected").to_json(orient="records")),
    }
    write_json_atomic(out_path, result)
    log.info("rung %d of %s/%s/%s (%d steps): %d of %d candidates go on", rung, first["source"], first["target"],
             first["method"], result["steps"], len(survivors), len(scores))
    return result
