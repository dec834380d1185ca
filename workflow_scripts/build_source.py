"""Rules pretrain_source / source_from_file / source_from_download: make the source network and evaluate it."""
from spbench.forkserver import delegate

delegate()  # a local run forks this job from its fork server, torch imported there already

from pathlib import Path

from spbench.pipeline import build_source, setup_logging

setup_logging(snakemake.log[0])
build_source(
    snakemake.config,
    snakemake.wildcards.source,
    Path(snakemake.input.meta).parent,
    snakemake.output.model,
    snakemake.output.info,
    weights_path=snakemake.input.get("weights"),
)
