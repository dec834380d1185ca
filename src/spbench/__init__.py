"""spbench: regularised fine-tuning (L2-SP and friends), as a library and a benchmark.

The public API, importable from the top level::

    from spbench import make_penalty, PENALTIES, estimate_fisher, normalize_fisher

Submodules: ``penalties``, ``fisher``, ``data``, ``models``, ``train``, ``pipeline``,
``results``, ``tracking``, ``reports``, ``config``. The library never imports Snakemake.
"""

import functools
from importlib import import_module
from pathlib import Path

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

__all__ = ["__version__", "code_version", *_PUBLIC]


@functools.cache
def code_version() -> str:
    """The version of the code that runs, as every run record states it: ``__version__``, and
    when this package runs from a git checkout that tracks it (an editable install), the
    commit, ``+g<commit>``, with ``.dirty`` when tracked files differ from it (PEP 440's local
    part). Worked out once per process."""
    return __version__ + git_suffix(Path(__file__).resolve())


def git_suffix(path: Path) -> str:
    """``+g<short commit>[.dirty]`` when ``path`` is a file tracked by a git checkout, else ""
    (no git, not a checkout, the file not tracked: e.g. an installed copy inside one)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True, check=True,
                              timeout=10, stdin=subprocess.DEVNULL).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "--", path.name)
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"+g{commit}" + (".dirty" if dirty else "")


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'spbench' has no attribute {name!r}")
