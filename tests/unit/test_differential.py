"""Compiled kernels and the JIT-off reference agree exactly.

The reference is the same source run as plain Python (``NUMBA_DISABLE_JIT=1``),
which can only be chosen at import time, so it runs in a subprocess over the same
deterministic workload: parser metadata (offsets, flags, errors, hashes, buckets),
L4 checksums, and a fuzz graph of two switches in a loop (frames out of every
port, every counter).
"""

from __future__ import annotations

import pytest
from reference import assert_matches_reference

SEED, N = 11, 1200



@pytest.mark.slow
def test_compiled_equals_reference():
    jit = assert_matches_reference("workload", "differential_outputs", SEED, N,
                                   timeout=600)
    # The workload is not trivial: most frames parse, some do not, ports carry traffic.
    perr = jit["meta"][:, 14]
    assert (perr == 0).sum() > N // 2 and (perr != 0).sum() > 50
    assert sum(len(jit[f"lens_h{i}"]) for i in range(1, 5)) > 200
