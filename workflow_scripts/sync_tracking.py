"""Rule sync_tracking: log to MLflow the run records it lacks (after a tracking outage)."""
from spbench.progress import setup_logging
from spbench.results import read_record
from spbench.tracking import sync_runs

setup_logging(snakemake.log[0])
p = snakemake.params
counts = sync_runs(p.uri, p.experiment, (read_record(r) for r in snakemake.input.records), timeout_s=p.timeout_s)
if counts["failed"]:
    raise SystemExit(f"{counts['failed']} of {counts['records']} runs are still missing from MLflow at {p.uri}")
