"""Rule activations: Fig. 4's R² per unit, fine-tuned vs pretrained, on target test images."""
from spbench.forkserver import delegate

delegate()  # a local run forks this job from its fork server, torch imported there already

from pathlib import Path

from spbench.pipeline import activation_table, setup_logging

setup_logging(snakemake.log[0])
finetuned = {k: v for k, v in snakemake.input.items() if ":" in k}
activation_table(
    snakemake.config,
    snakemake.wildcards.source,
    snakemake.input.source_model,
    Path(snakemake.input.target).parent,
    finetuned,
    snakemake.output.r2,
)
