"""Rule init_tracking: create the MLflow store and experiment once, before the fan-out."""
from spbench.pipeline import setup_logging
from spbench.results import write_json_atomic
from spbench.tracking import init_experiment

setup_logging(snakemake.log[0])
uri, experiment = snakemake.params.uri, snakemake.params.experiment
experiment_id = init_experiment(uri, experiment)
write_json_atomic(snakemake.output.marker, {"uri": uri, "experiment": experiment, "experiment_id": experiment_id})
