"""spbench: regularised fine-tuning (L2-SP and friends), as a library and a benchmark.

The library never imports Snakemake; the workflow's scripts call it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
