"""Rule collect_activations: one Parquet table from several with the same columns."""
import pandas as pd

from spbench.progress import setup_logging

setup_logging(snakemake.log[0])
pd.concat([pd.read_parquet(p) for p in snakemake.input.tables], ignore_index=True).to_parquet(
    snakemake.output[0], index=False
)
