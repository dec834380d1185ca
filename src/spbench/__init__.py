"""spbench: regularised fine-tuning (L2-SP and friends), as a library and a benchmark.

The public API, importable from the top level::

    from spbench import make_penalty, PENALTIES, estimate_fisher, normalize_fisher

Submodules: ``penalties``, ``fisher``, ``data``, ``models``, ``train``, ``pipeline``,
``results``, ``tracking``, ``reports``, ``config``. The library never imports Snakemake.
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> submodule; resolved on first use so that `import spbench` stays cheap.
_PUBLIC = {
    "Penalty": "penalties",
    "PENALTIES": "penalties",
    "make_penalty": "penalties",
    "register": "penalties",
    "estimate_fisher": "fisher",
    "normalize_fisher": "fisher",
    "save_fisher": "fisher",
    "load_fisher": "fisher",
    "build_model": "models",
    "split_parameters": "models",
    "apply_freeze": "models",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'spbench' has no attribute {name!r}")
