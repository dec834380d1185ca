"""Rule finetune: one fine-tune run -> its record (the source of truth), then MLflow.
On SIGTERM the run checkpoints and fails (spbench.train.Preempted); the retry resumes."""
from pathlib import Path

from spbench.config import RunSpec
from spbench.pipeline import finetune_run, run_config, setup_logging
from spbench.tracking import log_run

setup_logging(snakemake.log[0])
spec = RunSpec.from_wildcards(dict(snakemake.wildcards))
if spec.key != snakemake.params.run_key or not snakemake.output.record.endswith(f"{spec.key}/record.json"):
    raise ValueError(f"non-canonical run path {snakemake.output.record}: expected .../{spec.key}/record.json")
record, curve = finetune_run(
    snakemake.config,
    spec,
    source_model=snakemake.input.model,
    source_info=snakemake.input.info,
    target_dir=Path(snakemake.input.target).parent,
    source_dir=Path(snakemake.input.source).parent,
    fisher_path=snakemake.input.fisher or None,
    record_out=snakemake.output.record,
    model_out=snakemake.output.model,
    checkpoint_path=snakemake.params.checkpoint,
)
tracking = snakemake.config["tracking"]
if tracking["log_from"] == "jobs":  # else rule log_runs logs every run once the records are in
    log_run(tracking["uri"], tracking["experiment"], record, run_config(snakemake.config, spec), curve,
            timeout_s=tracking["timeout_s"])
