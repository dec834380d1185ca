"""Rules finetune_{experiment}: one run group's fine-tunes, one after the other -> their records
(the source of truth), then MLflow. On SIGTERM the running fine-tune checkpoints and fails
(spbench.train.Preempted); the retry restores the finished ones and resumes it."""
from spbench.forkserver import delegate

delegate()  # a local run forks this job from its fork server, torch imported there already

from pathlib import Path

from spbench.config import RunSpec
from spbench.pipeline import finetune_group, run_config, setup_logging
from spbench.tracking import log_run

setup_logging(snakemake.log[0])
specs = [RunSpec.from_key(key) for key in snakemake.params.run_keys]
for spec, record in zip(specs, snakemake.output.records):
    if not record.endswith(f"{spec.key}/record.json"):
        raise ValueError(f"non-canonical run path {record}: expected .../{spec.key}/record.json")
tracking = snakemake.config["tracking"]


def track(spec, record, curve):
    log_run(tracking["uri"], tracking["experiment"], record, run_config(snakemake.config, spec), curve,
            timeout_s=tracking["timeout_s"])


finetune_group(
    snakemake.config,
    specs,
    record_outs=list(snakemake.output.records),
    model_outs=list(snakemake.output.models),
    checkpoint_paths=list(snakemake.params.checkpoints),
    log_paths=list(snakemake.log),
    # with tracking.log_from: end, rule log_runs logs every run once the records are in
    on_record=track if tracking["log_from"] == "jobs" else None,
    source_model=snakemake.input.model,
    source_info=snakemake.input.info,
    target_dir=Path(snakemake.input.target).parent,
    source_dir=Path(snakemake.input.source).parent,
    fisher_path=snakemake.input.fisher or None,
)
