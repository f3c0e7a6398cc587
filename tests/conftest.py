"""Shared test helpers.

Every offline run in the suite goes through :func:`run_offline`, which fails the test
when the accounting invariant (packets in == out + named drops + held, per device and
per appliance) does not hold or a packet slot leaked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# kernel calls that skip numba's typing check their arguments' types at every call
# (dva._jit.KernelCall); set before dva is imported, and inherited by the workers
os.environ.setdefault("DVA_CHECK_CALLS", "1")

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("golden.harness")


def pytest_configure(config):
    config.addinivalue_line("markers", "system: needs root and network namespaces")
