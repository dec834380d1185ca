"""Rule report: tables and figures from runs.parquet alone."""
from spbench.pipeline import setup_logging
from spbench.reports import write_reports
from spbench.results import read_parquet

setup_logging(snakemake.log[0])
write_reports(read_parquet(snakemake.input.parquet), snakemake.params.out_dir)
