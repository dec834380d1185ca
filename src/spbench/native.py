"""spbench's native CPU kernel, built on first use by ``torch.utils.cpp_extension.load``.

One kernel so far: the proximal map of ``gl_sp_fisher`` (``csrc/fisher_group_prox.cpp``, used by
:meth:`spbench.penalties.GroupLassoSPFisher.prox_`, see :data:`spbench.penalties.NATIVE`).
Building it takes about a minute on a 2-core machine and needs a C++ compiler (``c++``, or
``$CXX``) and ninja (the ``ninja`` package, a dependency of spbench). The build is cached in
torch's extension directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), rebuilt when the source or the compiler flags change, and
guarded by a lock there, so that jobs starting together build it once. The loops are compiled
for AVX2 and for the baseline instruction set on x86-64, the right one picked at run time, so a
cache shared by machines of different generations stays valid.

Where the build fails, :func:`load` warns once, with the compiler's complaint, and returns None:
the callers then use the torch operations.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "fisher_group_prox.cpp"
FLAGS = ["-O3", "-fopenmp-simd"]


@functools.cache
def load():
    """The built extension module (``fisher_group_prox_(p, w0, f, t, max_iterations)``), or
    None where it cannot be built (a warning says why)."""
    # its import warns, on machines with a CUDA toolkit but no GPU, of a CUDA_HOME this CPU
    # build does not use
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    try:
        import ninja  # the ninja package puts its binary here; torch looks for it on PATH

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        return cpp_extension.load(name="spbench_native", sources=[str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as err:  # no compiler, no ninja, a compiler error: fall back, and say so
        lines = [line for line in str(err).splitlines() if line.strip()]
        warnings.warn(f"spbench's native kernel could not be built ({type(err).__name__}: "
                      f"{lines[-1] if lines else ''}); gl_sp_fisher's proximal map uses the torch operations",
                      RuntimeWarning, stacklevel=3)
        return None
