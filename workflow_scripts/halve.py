"""Checkpoint halve: one rung of successive halving; its best candidates go on to the next."""
from spbench.progress import setup_logging
from spbench.selection import halve

setup_logging(snakemake.log[0])
halve(snakemake.input.records, snakemake.output.survivors, rung=int(snakemake.wildcards.rung), eta=snakemake.params.eta)
