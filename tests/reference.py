"""Compiled kernels against the JIT-off reference, for any deterministic workload.

numba's JIT can only be switched off at import time, so the reference runs in a
subprocess: :func:`assert_matches_reference` calls ``MODULE.FUNC(*args)`` (a module
importable from ``tests/`` or ``tests/unit/``, returning a dict of numpy arrays) there
with ``NUMBA_DISABLE_JIT=1`` and here compiled, and asserts that every array is equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent

_SCRIPT = """
import sys
import numpy as np
sys.path[:0] = [{tests!r}, {unit!r}]
from dva._jit import JIT_ENABLED
assert not JIT_ENABLED
from {module} import {func}
np.savez(sys.argv[1], **{func}(*{args!r}))
"""


def assert_matches_reference(module: str, func: str, *args, timeout: float = 900
                             ) -> dict[str, np.ndarray]:
    """Run the workload both ways, assert equal outputs; returns the compiled ones."""
    from importlib import import_module

    script = _SCRIPT.format(tests=str(TESTS), unit=str(TESTS / "unit"), module=module,
                            func=func, args=args)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ref.npz"
        p = subprocess.run([sys.executable, "-c", script, str(out)], env=env,
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stderr[-3000:]
        jit = getattr(import_module(module), func)(*args)
        with np.load(out, allow_pickle=False) as ref:
            assert sorted(ref.files) == sorted(jit)
            for k in jit:
                assert np.array_equal(ref[k], jit[k]), \
                    f"{k} differs between JIT and reference"
    return jit
