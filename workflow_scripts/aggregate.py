"""Rule aggregate: every run record -> results/runs.parquet."""
from spbench.pipeline import aggregate_records, setup_logging

setup_logging(snakemake.log[0])
aggregate_records(snakemake.input.records, snakemake.output.parquet)
