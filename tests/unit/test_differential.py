"""Compiled kernels and the JIT-off reference agree exactly.

The reference is the same source run as plain Python (``NUMBA_DISABLE_JIT=1``),
which can only be chosen at import time, so it runs in a subprocess over the same
deterministic workload: parser metadata (offsets, flags, errors, hashes, buckets),
L4 checksums, and a fuzz graph of two switches in a loop (frames out of every
port, every counter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from workload import differential_outputs

TESTS = Path(__file__).resolve().parents[1]
SEED, N = 11, 1200

SCRIPT = f"""
import sys
import numpy as np
sys.path.insert(0, {str(TESTS)!r})
from dva._jit import JIT_ENABLED
assert not JIT_ENABLED
from workload import differential_outputs
np.savez(sys.argv[1], **differential_outputs({SEED}, {N}))
"""


@pytest.mark.slow
def test_compiled_equals_reference(tmp_path):
    out = tmp_path / "ref.npz"
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, env=env,
                   timeout=600)
    jit = differential_outputs(SEED, N)
    with np.load(out, allow_pickle=False) as ref:
        assert sorted(ref.files) == sorted(jit)
        for k in jit:
            assert np.array_equal(ref[k], jit[k]), f"{k} differs between JIT and reference"
    # The workload is not trivial: most frames parse, some do not, ports carry traffic.
    perr = jit["meta"][:, 14]
    assert (perr == 0).sum() > N // 2 and (perr != 0).sum() > 50
    assert sum(len(jit[f"lens_h{i}"]) for i in range(1, 5)) > 200
