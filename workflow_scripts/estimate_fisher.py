"""Rule estimate_fisher: diagonal Fisher of a source network on its source data."""
from spbench.forkserver import delegate

delegate()  # a local run forks this job from its fork server, torch imported there already

from pathlib import Path

from spbench.pipeline import compute_fisher, setup_logging

setup_logging(snakemake.log[0])
compute_fisher(
    snakemake.config,
    snakemake.wildcards.source,
    snakemake.input.model,
    Path(snakemake.input.meta).parent,
    snakemake.output.fisher,
)
