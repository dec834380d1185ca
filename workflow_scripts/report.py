"""Rule report: every table and figure from runs.parquet (and the analysis tables) alone."""
from pathlib import Path

from spbench.pipeline import setup_logging
from spbench.reports import main

setup_logging(snakemake.log[0])
args = [snakemake.input.parquet, str(snakemake.params.out_dir)]
for key in ("r2", "overhead"):
    if key in snakemake.input.keys():
        args += [f"--{key}", snakemake.input[key]]
figures = snakemake.config.get("figures", {})
if "alpha_beta" in figures:
    args += ["--fig1-method", figures["alpha_beta"]["method"], "--fig1-target", figures["alpha_beta"]["target"]]
if "freeze" in figures:
    args += ["--fig3-methods", ",".join(figures["freeze"]["methods"])]
main(args)
missing = [p for p in snakemake.output if not Path(p).exists()]
if missing:
    raise RuntimeError(f"the report builders did not write {missing}")
