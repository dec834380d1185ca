"""Rule aggregate: every run record -> results/runs.parquet."""
from spbench.progress import setup_logging
from spbench.results import aggregate_records

setup_logging(snakemake.log[0])
aggregate_records(snakemake.input.records, snakemake.output.parquet)
