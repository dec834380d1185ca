"""Checkpoint select_setting: choose a method's setting (hyper-parameters and lr) on validation folds."""
from spbench.progress import setup_logging
from spbench.selection import select_setting

setup_logging(snakemake.log[0])
select_setting(snakemake.input.records, snakemake.output.selection, snakemake.input.get("rungs", []))
