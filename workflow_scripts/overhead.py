"""Rule overhead: FLOPs and time of one training step with each penalty (section 4.4.1),
for the source's architecture at its source task's image size."""
from spbench.forkserver import delegate

delegate()  # a local run forks this job from its fork server, torch imported there already

import json
from pathlib import Path

from spbench.pipeline import overhead_table, setup_logging

setup_logging(snakemake.log[0])
meta = json.loads(Path(snakemake.input.task).read_text())
overhead_table(
    [snakemake.params.arch],
    snakemake.params.penalties,
    snakemake.params.options,
    snakemake.output.overhead,
    image_size=meta["image_size"][0],
    in_channels=meta["channels"],
    num_classes=meta["num_classes"],
)
