"""Rule prepare_task: build one task into the on-disk format."""
from spbench.forkserver import delegate

delegate()  # a local run forks this job from its fork server, torch imported there already

from pathlib import Path

from spbench.pipeline import prepare_task_from_config, setup_logging

setup_logging(snakemake.log[0])
prepare_task_from_config(snakemake.config, snakemake.wildcards.task, Path(snakemake.output.meta).parent)
