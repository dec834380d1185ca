"""Rule extract: unpack a verified archive, refusing members that would leave the folder."""
from spbench.download import extract_archive
from spbench.progress import setup_logging

setup_logging(snakemake.log[0])
extract_archive(snakemake.input[0], snakemake.output[0])
