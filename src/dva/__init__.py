"""dva: distributed virtual network appliances."""

import os as _os

# dva never uses BLAS, but numpy's (and scipy's, which numba may load) OpenBLAS start a
# pool of threads that spin on the cores the data plane runs on: measured 2x slower
# parse+switch on a 2-core machine. Set before numpy is imported; an explicit
# setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
