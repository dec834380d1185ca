"""Rule report: every table and figure from runs.parquet (and the analysis tables) alone."""
import json
from pathlib import Path

from spbench.progress import setup_logging
from spbench.reports import main

setup_logging(snakemake.log[0])
args = [snakemake.input.parquet, str(snakemake.params.out_dir)]
for key in ("r2", "overhead"):
    if key in snakemake.input.keys():
        args += [f"--{key}", snakemake.input[key]]
options = json.loads(snakemake.params.options)
if "fig1" in options:
    args += ["--fig1-method", options["fig1"]["method"], "--fig1-target", options["fig1"]["target"]]
if "fig3" in options:
    args += ["--fig3-methods", ",".join(options["fig3"]["methods"])]
if "published" in options:
    args += ["--published", json.dumps(options["published"])]
main(args)
missing = [p for p in snakemake.output if not Path(p).exists()]
if missing:
    raise RuntimeError(f"the report builders did not write {missing}")
