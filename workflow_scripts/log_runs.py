"""Rule log_runs (tracking.log_from: end): log every run record MLflow lacks, in one process.
A tracking outage does not fail the workflow: the counts say what is missing, and
`snakemake sync_tracking` logs it later."""
from spbench.progress import setup_logging
from spbench.results import read_record, write_json_atomic
from spbench.tracking import sync_runs

setup_logging(snakemake.log[0])
p = snakemake.params
counts = sync_runs(p.uri, p.experiment, (read_record(r) for r in snakemake.input.records), timeout_s=p.timeout_s)
write_json_atomic(snakemake.output.logged, counts)
