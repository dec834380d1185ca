"""Rule init_tracking: create the MLflow store and experiment once, before the fan-out."""
from spbench.progress import setup_logging
from spbench.results import write_json_atomic
from spbench.tracking import try_init_experiment

setup_logging(snakemake.log[0])
uri, experiment = snakemake.params.uri, snakemake.params.experiment
# None when the server is down: runs keep their records, `snakemake sync_tracking` logs them later.
experiment_id = try_init_experiment(uri, experiment, timeout_s=snakemake.params.timeout_s)
write_json_atomic(snakemake.output.marker, {"uri": uri, "experiment": experiment, "experiment_id": experiment_id})
